"""The write-behind window against Redis durability: appendfsync everysec vs always.

    .venv/bin/python -m bench.aof [--debits 30000] [--concurrency 64]

For each setting, a private redis-server (AOF on) takes ``--debits`` real debits
(``Engine.debit``, batched as in the service) from one process with ``--concurrency`` in
flight; then the server is SIGKILLed and restarted from its AOF, and the ledger entries
that survived are counted. A SIGKILL of the process loses nothing the kernel already has
(both settings write every command to the AOF before answering); what everysec risks is
the last second of writes when the *machine* loses power, which no test here can cause.
So the table gives the measured throughput and the measured survivors, and the loss bound
follows from the setting: everysec = up to ~1 s of accepted events (its rate x 1 s),
always = none.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError

from core.clock import SystemClock
from core.settings import load_settings
from lua.connection import PipelinedRedis
from lua.keys import Keys
from lua.replies import Status
from ops.devservers import EmbeddedRedis
from quota.engine import Engine


async def run_one(fsync: str, debits: int, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="qg-aof-") as tmp:
        server = EmbeddedRedis(Path(tmp), persist=True, appendfsync=fsync)
        url = server.start()
        keys = Keys("qgaof", 16)
        admin = aioredis.Redis.from_url(url, decode_responses=True)
        for shard in range(16):
            await admin.hset(keys.plans(shard), mapping={"~v": "1", "b": "chat",
                                                         "b|chat": f"m:{10**15}"})
        users = [f"u{i}" for i in range(1000)]
        for user in users:
            await admin.hset(keys.user(user), mapping={"loaded": "1", "plan": "b", "exp": "0"})
        client = PipelinedRedis(url, timeout_seconds=10, connect_timeout_seconds=5)
        # The real Engine.debit (no PostgreSQL: every user and the catalog are in Redis).
        settings = load_settings({"REDIS_URL": url, "DB_DSN": "postgresql://unused@127.0.0.1:1/x",
                                  "KEY_PREFIX": "qgaof", "N_SHARDS": "16", "DEFAULT_PLAN": "b"})
        engine = Engine(settings, client, None, SystemClock())  # type: ignore[arg-type]

        async def one(i: int) -> None:
            reply = await engine.debit(users[i % len(users)], "chat", 1_000_000, f"r{i}",
                                       caller="bench", action="chat_tokens")
            assert reply.status is Status.OK, reply

        started = time.monotonic()
        for base in range(0, debits, concurrency):
            await asyncio.gather(*(one(i) for i in range(base, min(debits, base + concurrency))))
        elapsed = time.monotonic() - started
        await client.close()
        before = sum([await admin.xlen(keys.ledger(s)) for s in range(16)])
        await admin.aclose()
        server.kill()
        server.start()
        admin = aioredis.Redis.from_url(url, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:  # the restarted server answers LOADING until the AOF is replayed
            try:
                after = sum([await admin.xlen(keys.ledger(s)) for s in range(16)])
                break
            except BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await admin.aclose()
        server.stop()
        return {"debits_per_second": round(debits / elapsed), "ledger_entries": before,
                "survived_sigkill": after}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    for fsync in ("everysec", "always"):
        result = await run_one(fsync, args.debits, args.concurrency)
        print(f"appendfsync {fsync}: {result}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
