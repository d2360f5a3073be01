"""Named SQL statements, parsed once from ``sql/queries.sql``.

Each statement sits under a ``-- name: <name> --`` header, then comment lines that describe
it and name its parameters; the rest up to the next header is the SQL.
"""

from __future__ import annotations

import re
from importlib import resources

_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*) --\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a queries file into {name: sql}, dropping the description comments."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        sql = "\n".join(lines).strip()
        if not sql:
            raise ValueError(f"query {name!r} has no SQL")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = sql
    return queries


def _load(filename: str) -> dict[str, str]:
    path = resources.files(__package__) / "sql" / filename
    return parse(path.read_text(encoding="utf-8"))


QUERIES: dict[str, str] = _load("queries.sql")
