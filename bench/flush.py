"""Write-behind throughput and lag: can the reconciler keep up with the hot path?

    .venv/bin/python -m bench.flush [--events 100000] [--rate 6000] [--seconds 20]

1. Fill the shard streams with ``--events`` real debits (the debit script, in-process,
   many users), then time one reconciler process draining them into PostgreSQL:
   events per second.
2. Sustain debits at ``--rate`` per second for ``--seconds`` while a reconciler process
   (``quota-gateway reconcile``) flushes; sample the age of the oldest unflushed entry every
   50 ms: flush lag p50/p99/max.

Uses its own database ``qg_bench_flush`` and key prefix ``qgflush`` on REDIS_URL / DB_DSN
(default: the local servers), and removes both afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from core.clock import SystemClock
from core.settings import Settings
from persistence.migrate import migrate
from persistence.plans import MeterRule, Plan, put_plan, read_catalog_file, seed_missing
from quota.engine import make_engine
from reconciler.consumer import StreamConsumer, lag_seconds
from reconciler.main import Reconciler

PREFIX = "qgflush"
DB = "qg_bench_flush"
USERS = 2000


async def setup(admin_dsn: str) -> str:
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DB}"')
    await admin.close()
    dsn = admin_dsn.rsplit("/", 1)[0] + f"/{DB}"
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    return dsn


async def teardown(admin_dsn: str, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{PREFIX}:*", count=5000)]
    for i in range(0, len(keys), 1000):
        await client.unlink(*keys[i : i + 1000])
    await client.aclose()
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await admin.close()


async def load(settings: Settings, events: int, rate: float | None, seconds: float) -> int:
    """Debits through the real engine: ``events`` as fast as possible, or at ``rate``/s."""
    engine = make_engine(settings, SystemClock())
    big = Plan("flushbench", {"chat": MeterRule("month", 10**15)}, None, "0.00", "RUB")
    await put_plan(engine.db, big, "bench")
    await engine.loader.sync_catalog()
    for i in range(USERS):
        await engine.plans.apply(f"fb-{i}", "flushbench", None, "bench")
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        reply = await engine.debit(f"fb-{i % USERS}", "chat", 1_000_000, f"r{i}-{time.time_ns()}")
        done += reply.status == 1

    started = time.monotonic()
    if rate is None:
        for base in range(0, events, 500):
            await asyncio.gather(*(one(i) for i in range(base, min(events, base + 500))))
    else:
        i = 0
        tick = 0.01
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate)
            batch = [one(j) for j in range(i, due)]
            i = due
            await asyncio.gather(*batch)
            await asyncio.sleep(tick)
    await engine.close()
    return done


def reconciler_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "--log-level", "warning",
                             "reconcile"], env=env)


async def backlog(settings: Settings, redis: aioredis.Redis) -> tuple[int, float]:
    from lua.keys import Keys

    consumer = StreamConsumer(redis, Keys(settings.key_prefix, settings.n_shards), "probe",
                              per_stream_count=1, block_ms=1, claim_idle_ms=1)
    lags = await consumer.lag()
    return sum(lag.entries for lag in lags), lag_seconds(lags)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=6000)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    admin_dsn = os.environ.get("DB_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    dsn = await setup(admin_dsn)
    settings = Settings(redis_url=redis_url, db_dsn=dsn, key_prefix=PREFIX,
                        max_backlog_entries=10**9)
    engine = make_engine(settings)
    await seed_missing(engine.db, read_catalog_file())
    await engine.close()
    env = {**os.environ, "REDIS_URL": redis_url, "DB_DSN": dsn, "KEY_PREFIX": PREFIX}
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    results: dict[str, object] = {}
    try:
        # 1. drain throughput
        accepted = await load(settings, args.events, None, 0)
        entries, _ = await backlog(settings, redis)
        engine = make_engine(settings)
        reconciler = Reconciler(engine, redis, name="bench-drain")
        started = time.monotonic()
        await reconciler.drain()
        elapsed = time.monotonic() - started
        await engine.close()
        results["drain"] = {"accepted": accepted, "entries": entries,
                            "inserted": reconciler.stats.inserted,
                            "seconds": round(elapsed, 2),
                            "events_per_second": round(reconciler.stats.inserted / elapsed)}
        print("drain:", results["drain"], flush=True)
        # 2. lag under sustained load, reconciler in its own process
        proc = reconciler_process(env)
        samples: list[float] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((await backlog(settings, redis))[1])
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        accepted = await load(settings, 0, args.rate, args.seconds)
        stop.set()
        await sampler
        deadline = time.monotonic() + 60
        while (await backlog(settings, redis))[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        proc.terminate()
        proc.wait(30)
        samples.sort()
        results["lag"] = {
            "rate_target": args.rate, "accepted": accepted,
            "rate_achieved": round(accepted / args.seconds),
            "samples": len(samples), "p50_s": samples[len(samples) // 2],
            "p99_s": samples[int(len(samples) * 0.99) - 1], "max_s": samples[-1],
        }
        print("lag:", results["lag"], flush=True)
    finally:
        await redis.aclose()
        await teardown(admin_dsn, redis_url)
    Path("bench/flush_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
