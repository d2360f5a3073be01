"""What every layer shares and that imports nothing of ours: errors, amounts, the clock
and ids, settings, metrics, the ledger event format."""
