"""The PostgreSQL pool and the boundary where driver errors become DependencyUnavailable."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson

from core.errors import DependencyUnavailable
from persistence.queries import QUERIES

#: Driver errors that mean "PostgreSQL is not there right now", never the caller's fault.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    # A pooled connection that received the server's shutdown notice while idle is left
    # mid-protocol; using or releasing it raises this instead of a connection error.
    asyncpg.InternalClientError,
)


class PostgresUnavailable(DependencyUnavailable):
    """PostgreSQL could not be reached or did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__("postgres", message)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
        schema="pg_catalog",
    )


class Database:
    """A lazily created asyncpg pool, with every query called by its name."""

    def __init__(self, dsn: str, *, min_size: int, max_size: int, timeout: float) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None

    async def pool(self) -> asyncpg.Pool:
        """The pool, created on first use so the service starts while PostgreSQL is down."""
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=self.min_size, max_size=self.max_size,
                    timeout=self.timeout, command_timeout=self.timeout, init=_init_connection,
                )
            except UNAVAILABLE_ERRORS as exc:
                raise PostgresUnavailable(f"cannot connect to PostgreSQL: {exc!r}") from None
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; driver failures surface as PostgresUnavailable."""
        pool = await self.pool()
        try:
            async with pool.acquire(timeout=self.timeout) as conn:
                yield conn
        except UNAVAILABLE_ERRORS as exc:
            raise PostgresUnavailable(f"PostgreSQL unavailable: {exc!r}") from None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside one transaction."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside one read-only REPEATABLE READ transaction: every read sees
        the same committed state."""
        async with self.connection() as conn, conn.transaction(
            isolation="repeatable_read", readonly=True
        ):
            yield conn

    async def fetch(self, name: str, *args: Any, query_timeout: float | None = None
                    ) -> list[asyncpg.Record]:
        """Run a named query and return its rows (``query_timeout``: seconds, for a long
        one; DB_TIMEOUT_SECONDS otherwise)."""
        async with self.connection() as conn:
            return list(await conn.fetch(QUERIES[name], *args, timeout=query_timeout))

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        """Run a named query and return its first row, if any."""
        async with self.connection() as conn:
            return await conn.fetchrow(QUERIES[name], *args)

    async def fetchval(self, name: str, *args: Any) -> Any:
        """Run a named query and return the first column of its first row."""
        async with self.connection() as conn:
            return await conn.fetchval(QUERIES[name], *args)

    async def close(self) -> None:
        """Close the pool, if it was ever opened."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
