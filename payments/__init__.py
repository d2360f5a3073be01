"""Money: credits and refunds written through, the payment webhook, its verifiers."""
