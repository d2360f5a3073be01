"""PostgreSQL, the source of truth: schema migrations, named queries, the pool."""
