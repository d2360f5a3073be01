"""Write-behind: ledger streams to PostgreSQL, pending applies, the nightly report."""
