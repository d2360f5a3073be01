"""Cold loads: how fast users come back after Redis lost its data (issue #20).

N users with a plan (pro_month), credits and 20 flushed debits each (so 20 idempotency
keys to restore) are loaded from PostgreSQL by their first request after a private Redis
was emptied: ``Engine.check`` from 64 concurrent callers, each on a user of its own, in
one process (no HTTP). Reports users/s and the CPU per load of this process (the loader),
the private Redis and PostgreSQL (the postmaster and its children), and the time 100,000
users would take at that rate (``make bench``'s row 7 runs this).

    python -m bench.cold_loads [--users 3000] [--debits 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from bench.memory import private_redis_process
from bench.run import Cpu, backends_of, tree_of
from core.settings import load_settings
from quota.engine import Engine, make_engine
from reconciler.main import Reconciler

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def prepare(engine: Engine, dsn: str, users: list[str], debits: int) -> None:
    """Plans and credits written in bulk; debits through the engine, then flushed."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO user_plans (user_id, plan_code, expires_at) VALUES "
            "($1, 'pro_month', now() + interval '30 days')", [(u,) for u in users])
        await conn.executemany(
            "INSERT INTO credit_balances (user_id, meter, balance_micro) VALUES "
            "($1, 'chat', 5000000)", [(u,) for u in users])
    finally:
        await conn.close()

    async def spend(user: str) -> None:
        for i in range(debits):
            await engine.debit(user, "chat", 1_000_000, f"r{i}-{user}")

    for i in range(0, len(users), 200):
        await asyncio.gather(*(spend(u) for u in users[i:i + 200]))
    redis = aioredis.Redis.from_url(engine.settings.redis_url or "", decode_responses=True)
    try:
        await Reconciler(engine, redis, name="cold").drain()
    finally:
        await redis.aclose()


async def measure(engine: Engine, users: list[str], concurrency: int,
                  cpu: Cpu) -> tuple[float, dict[str, float]]:
    """Seconds for every user's first check, and the CPU seconds of each process group."""
    queue = list(users)

    async def caller() -> None:
        while queue:
            await engine.check(queue.pop())

    before, started = cpu.read(), time.perf_counter()
    if os.environ.get("BENCH_PROFILE"):  # where the loader's CPU goes
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    else:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    seconds, after = time.perf_counter() - started, cpu.read()
    return seconds, {k: after[k] - before[k] for k in ("driver", "redis", "postgres")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--debits", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool", type=int, default=64,
                        help="PostgreSQL connections of the loader (DB_POOL_MAX)")
    parser.add_argument("--out", default=None,
                        help="result file (default bench/results/<date>-cold-loads-<commit>.json)")
    args = parser.parse_args()
    name = f"qg_bench_cold_{secrets.token_hex(3)}"
    subprocess.run(["psql", ADMIN_DSN, "-qc", f'CREATE DATABASE "{name}"'], check=True)
    dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        with private_redis_process() as (url, redis_proc):
            cpu = Cpu({"redis": tree_of(redis_proc.pid),
                       "postgres": backends_of(ADMIN_DSN, name)})
            env = {"REDIS_URL": url, "DB_DSN": dsn, "DB_POOL_MAX": str(args.pool)}
            subprocess.run([sys.executable, "-m", "ops.cli", "migrate"], check=True,
                           env={**os.environ, **env},
                           stdout=subprocess.DEVNULL)
            users = [f"cold-{i}" for i in range(args.users)]

            async def run() -> tuple[float, dict[str, float]]:
                engine = make_engine(load_settings(env))
                try:
                    await prepare(engine, dsn, users, args.debits)
                    client = aioredis.Redis.from_url(url)
                    await client.flushdb()  # Redis lost its data
                    await client.aclose()
                    await engine.loader.sync_catalog()
                    return await measure(engine, users, args.concurrency, cpu)
                finally:
                    await engine.close()

            seconds, cpu_s = asyncio.run(run())
    finally:
        subprocess.run(["psql", ADMIN_DSN, "-qc", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'],
                       check=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    per_user = {"loader" if k == "driver" else k: round(v / args.users * 1e6)
                for k, v in cpu_s.items()}
    per_user["all_in"] = sum(per_user.values())
    result = {"date": datetime.now(tz=UTC).isoformat(timespec="seconds"), "commit": commit,
              "users": args.users, "debits_each": args.debits,
              "concurrency": args.concurrency, "db_pool": args.pool,
              "seconds": round(seconds, 2),
              "users_per_second": round(args.users / seconds),
              "cpu_us_per_user": per_user,
              "seconds_for_100k_users": round(100_000 * seconds / args.users, 1)}
    out = Path(args.out) if args.out else \
        ROOT / "bench" / "results" / f"{result['date'][:10]}-cold-loads-{commit}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
