"""HTTP hot path: parse, authenticate, validate, one Lua call, respond."""
