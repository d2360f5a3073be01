"""The engine: debits and checks, loading users from PostgreSQL, plans, the outbox."""
