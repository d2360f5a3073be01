"""Write-behind: ledger streams to PostgreSQL, rehydration, reports."""
