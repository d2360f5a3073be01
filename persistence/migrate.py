"""Numbered plain-SQL migrations, applied in order, once, under an advisory lock.

A small runner rather than a migration framework: the schema is plain ``.sql`` files
(``sql/migrations/NNNN_name.sql``), the driver is asyncpg (the frameworks want a DB-API
driver or an ORM), and what is needed is: order, once, one transaction per file, a
checksum so an edited applied file is caught. See docs/architecture.md.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 7311000


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema change file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text, recorded when applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover() -> list[Migration]:
    """Every migration shipped with the package, in version order, without gaps."""
    folder = resources.files(__package__) / "sql" / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        raise RuntimeError(f"migrations must be numbered 1..n without gaps: {found}")
    return found


@functools.cache
def latest() -> int:
    """The newest migration this build ships: the schema its code needs."""
    return len(discover())


async def schema_behind(conn: asyncpg.Connection) -> str | None:
    """None when the database holds every migration of this build; else what to do.

    A build whose schema is not there yet must not serve or flush: its queries would fail
    on every call (an unknown column), and the reconciler would set events aside as poison.
    """
    try:
        have = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        have = 0
    if have >= latest():
        return None
    return (f"the database schema is at migration {have} and this build needs {latest()}: "
            "run `quota-gateway migrate`")


class MigrationError(RuntimeError):
    """An applied migration changed after it was applied."""


async def migrate(conn: asyncpg.Connection, *, until: int | None = None) -> list[str]:
    """Apply every pending migration (up to version ``until``, tests of a migration over
    data); return the names applied."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        applied = {r["version"]: r["checksum"] for r in rows}
        for migration in discover():
            if until is not None and migration.version > until:
                break
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} changed after it "
                        "was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            applied_now.append(f"{migration.version:04d}_{migration.name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now
