"""The HTTP-only baseline: the real app, with an engine whose debit does no I/O.

``build_app`` and ``Api`` are the service's own, so a request to
``POST /internal/billing/quota/debit`` is parsed, authenticated, validated, timed in the
Prometheus histogram, counted, and answered with the same JSON shape as in production;
only the Lua call is replaced by a canned OK ``DebitReply``. The gap between this server
and the real one is the cost of the Redis round trip (client, network, script).

``BENCH_NOREDIS_MODE`` picks a diagnostic variant that splits that gap: ``yield`` (the
request also suspends and resumes once on the event loop) and ``python`` (also all the
Python work of ``Engine.debit``: keys, tx id, command packing, reply parsing and decoding).

Serve it exactly as ``quota-gateway serve`` serves the real app::

    python -m bench.noredis_app --port 8002 --workers 2

or as a uvicorn factory: ``uvicorn bench.noredis_app:create_app --factory``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from typing import Any

import hiredis
from starlette.applications import Starlette

from core import refs
from core.clock import SystemClock
from core.events import debit_event_head
from core.settings import load_settings
from hotpath.app import build_app
from lua.replies import DebitReply, Status
from lua.source import SCRIPTS
from ops.cli import tune_gc
from ops.workers import run_uvicorn
from quota.engine import Engine

#: A reply of the same shape and sizes as a real one (a UUIDv7 tx id, a large remainder).
CANNED = DebitReply(
    Status.OK, tx_id="019ab0c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d", remaining=999_999_000_000_000,
    from_allowance=1_000_000, from_credits=0, plan_code="bench",
)


class _Unused:
    """Stands in for the Redis client and the database: any use is a bug of the stub."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the no-Redis baseline must not touch {name}")


class NoRedisEngine(Engine):
    """An engine whose ``debit`` answers OK at once, without I/O."""

    async def debit(
        self, user_id: str, meter: str, amount: int, ref: str, *,
        reason: str = "", caller: str = "", action: str = "",
    ) -> DebitReply:
        return CANNED


class YieldEngine(Engine):
    """Diagnostics (BENCH_NOREDIS_MODE=yield): canned reply after one event-loop round trip,
    i.e. the request task suspends and resumes once, as it does around a Redis call."""

    async def debit(
        self, user_id: str, meter: str, amount: int, ref: str, *,
        reason: str = "", caller: str = "", action: str = "",
    ) -> DebitReply:
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_result, None)
        await future
        return CANNED


class PythonWorkEngine(Engine):
    """Diagnostics (BENCH_NOREDIS_MODE=python): everything ``Engine.debit`` does in Python
    (keys, windows, tx id, command packing, reply parsing and decoding) plus one event-loop
    round trip, but no socket and no Redis."""

    _REPLY = b"*5\r\n:4\r\n:1\r\n:999999000000000\r\n:0\r\n$5\r\nbench\r\n"

    async def debit(
        self, user_id: str, meter: str, amount: int, ref: str, *,
        reason: str = "", caller: str = "", action: str = "",
    ) -> DebitReply:
        windows = self.rt.windows()
        script = SCRIPTS["debit_many"]
        h = refs.ref_hash(user_id, ref)
        tx_id, record_id = refs.debit_tx(h)
        ref_record = h[:refs.FIELD_BYTES] + refs.fingerprint(meter, amount, reason) + record_id
        event_head = debit_event_head(tx_id, user_id, meter, amount, ref, reason, caller, action)
        # Packed as a batch of one (the real path shares one call among several debits).
        packed = hiredis.pack_command((
            "EVALSHA", script.sha, 6, *self.keys.debit_keys(user_id, meter, windows),
            *self.debit_header(windows), meter, amount, ref_record, event_head,
        ))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(future.set_result, len(packed))
        await future
        reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        reader.feed(self._REPLY)
        return DebitReply.decode(reader.gets()[1:], tx_id, amount)


_ENGINES = {"canned": NoRedisEngine, "yield": YieldEngine, "python": PythonWorkEngine}


def create_app() -> Starlette:
    """The uvicorn factory: the real app around ``NoRedisEngine`` (or a diagnostic one),
    with the same GC tuning as the service's workers."""
    settings = load_settings()
    cls = _ENGINES[os.environ.get("BENCH_NOREDIS_MODE", "canned")]
    engine = cls(settings, _Unused(), _Unused(), SystemClock())  # type: ignore[arg-type]
    app = build_app(settings, engine, owns_resources=False)
    tune_gc()  # as `quota-gateway serve` does for its workers
    return app


def main() -> None:
    """Serve with the same uvicorn options as ``quota-gateway serve``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    multiproc = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # What `quota-gateway serve` does: with several workers, metrics go to files.
        multiproc = tempfile.mkdtemp(prefix="quota-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc
    try:
        run_uvicorn("bench.noredis_app:create_app", args.host, args.port, args.workers)
    finally:
        if multiproc:
            shutil.rmtree(multiproc, ignore_errors=True)


if __name__ == "__main__":
    main()
