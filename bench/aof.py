"""The write-behind window against Redis durability: appendfsync everysec vs always.

    .venv/bin/python -m bench.aof [--debits 30000] [--concurrency 64]

For each setting, a private redis-server (AOF on) takes ``--debits`` real debit-script
calls from one process with ``--concurrency`` in flight; then the server is SIGKILLed
and restarted from its AOF, and the ledger entries that survived are counted. A SIGKILL of
the process loses nothing the kernel already has (both settings write every command to
the AOF before answering); what everysec risks is the last second of writes when the
*machine* loses power, which no test here can cause. So the table gives the measured
throughput and the measured survivors, and the loss bound follows from the setting:
everysec = up to ~1 s of accepted events (its rate x 1 s), always = none.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError

from hotpath.devservers import EmbeddedRedis
from lua import SCRIPTS, Keys
from lua.connection import PipelinedRedis
from lua.periods import Calendar


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
        now = int(time.time() * 1000)
        w = Calendar("UTC").windows(now)
        script = SCRIPTS["debit"]

        async def one(i: int) -> None:
            user = users[i % len(users)]
            ref = f"r{i}"
            await client.run_script(script, keys.debit_keys(user, ref, "chat", w), (
                user, "chat", 1_000_000, ref, "chat:1000000:", "", "bench", f"tx-{i}", 0,
                w.day_id, w.day_start_ms, w.day_end_ms, w.month_id, w.month_start_ms,
                w.month_end_ms, 86_400_000, 86_400_000, 86_400_000, 10**9, "b", "chat_tokens"))

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
