"""The design a user would otherwise build: one PostgreSQL transaction per debit.

Same stack as the service (Starlette under uvicorn with uvloop and httptools, asyncpg pool,
msgspec parsing of the same body, the same X-Internal-Key check), but the quota lives in
two tables of the bench database::

    BEGIN;
    INSERT INTO bench_pg_refs (user_id, ref) VALUES ($1, $2) ON CONFLICT DO NOTHING;
        -- no row inserted: the ref was already used -> 409, nothing else happens
    UPDATE bench_pg_quota SET used = used + $2
        WHERE user_id = $1 AND used + $2 <= lim RETURNING lim - used;
        -- no row: not enough quota -> ROLLBACK (the ref is not consumed), 409
    COMMIT;

Run ``python -m bench.pg_baseline setup --users 1000`` once (creates and fills the tables),
then ``python -m bench.pg_baseline serve --port 8003 --workers 2``. The DSN comes from
``BENCH_PG_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/qg_bench``); the pool size
per worker from ``BENCH_PG_POOL`` (default 16). asyncpg's pool sends a reset query
(``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) each time a connection goes
back to the pool, as it does for the service's own pool; ``BENCH_PG_RESET=0`` skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import QuotaError
from core.settings import load_settings
from hotpath.auth import Authenticator
from hotpath.schemas import ENCODER, QuotaDebitIn, decode, micro
from ops.workers import run_uvicorn

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/qg_bench"
LIMIT_MICRO = 10**15  # effectively unlimited, like the `bench` plan of the real service

SCHEMA = """
DROP TABLE IF EXISTS bench_pg_refs;
DROP TABLE IF EXISTS bench_pg_quota;
CREATE TABLE bench_pg_quota (
    user_id text PRIMARY KEY,
    used    bigint NOT NULL DEFAULT 0,
    lim     bigint NOT NULL
);
CREATE TABLE bench_pg_refs (
    user_id text NOT NULL,
    ref     text NOT NULL,
    PRIMARY KEY (user_id, ref)
);
"""
INSERT_REF = ("INSERT INTO bench_pg_refs (user_id, ref) VALUES ($1, $2) "
              "ON CONFLICT DO NOTHING RETURNING 1")
UPDATE_QUOTA = ("UPDATE bench_pg_quota SET used = used + $2 "
                "WHERE user_id = $1 AND used + $2 <= lim RETURNING lim - used")
_JSON = "application/json"


def _dsn() -> str:
    return os.environ.get("BENCH_PG_DSN", DEFAULT_DSN)


async def setup(users: int, prefix: str = "bu") -> None:
    """(Re)create the two tables and give ``users`` users an allowance."""
    conn = await asyncpg.connect(_dsn())
    try:
        await conn.execute(SCHEMA)
        await conn.execute(
            "INSERT INTO bench_pg_quota (user_id, lim) "
            "SELECT $1 || g, $2 FROM generate_series(0, $3 - 1) AS g",
            prefix, LIMIT_MICRO, users,
        )
        await conn.execute("ANALYZE bench_pg_quota")
    finally:
        await conn.close()


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


def _error(status: int, code: str, message: str) -> Response:
    body = ENCODER.encode({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type=_JSON)


def create_app() -> Starlette:
    """The uvicorn factory."""
    settings = load_settings()
    auth = Authenticator(settings.all_callers())
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        size = int(os.environ.get("BENCH_PG_POOL", "16"))
        options: dict[str, Any] = {}
        if os.environ.get("BENCH_PG_RESET", "1") == "0":
            # Skip asyncpg's reset query (one more round trip) when a connection goes back
            # to the pool: safe here, the app uses no session state.
            options["reset"] = _no_reset
        state["pool"] = await asyncpg.create_pool(_dsn(), min_size=size, max_size=size,
                                                  **options)
        yield
        await state["pool"].close()

    async def debit(request: Request) -> Response:
        try:
            auth.require(auth.authenticate(request.headers.get("x-internal-key")), "debit")
            if request.headers.get("content-type", "").split(";")[0].strip() != _JSON:
                return _error(415, "unsupported_media_type", "Content-Type must be JSON")
            body = decode(await request.body(), QuotaDebitIn)
            amount = micro(body.units, "units")
        except QuotaError as exc:
            return _error(exc.status, exc.code, exc.message)
        pool: asyncpg.Pool = state["pool"]
        async with pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(INSERT_REF, body.user_id, body.ref) is None:
                return _error(409, "duplicate_ref", "this ref was already debited")
            remaining = await conn.fetchval(UPDATE_QUOTA, body.user_id, amount)
            if remaining is None:
                # Leaving the block by an exception rolls back: the ref stays unused.
                raise _Insufficient
        return Response(ENCODER.encode({"ref": body.ref, "remaining": remaining}),
                        media_type=_JSON)

    async def debit_endpoint(request: Request) -> Response:
        try:
            return await debit(request)
        except _Insufficient:
            return _error(409, "insufficient_quota", "not enough quota")

    return Starlette(
        routes=[Route("/internal/billing/quota/debit", debit_endpoint, methods=["POST"])],
        lifespan=lifespan,
    )


class _Insufficient(Exception):
    """Raised inside the transaction to roll it back."""


def main() -> None:
    """``setup`` the tables or ``serve`` the app."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_setup = sub.add_parser("setup")
    p_setup.add_argument("--users", type=int, default=1000)
    p_setup.add_argument("--prefix", default="bu")
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8003)
    p_serve.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.command == "setup":
        asyncio.run(setup(args.users, args.prefix))
        return
    run_uvicorn("bench.pg_baseline:create_app", args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
