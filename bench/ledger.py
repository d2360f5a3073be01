"""The ledger at volume: bytes per row, the report's time, a month's rollup and drop.

    .venv/bin/python -m bench.ledger [--rows 10000000] [--users 100000] [--out FILE]

In a database of its own (``qg_bench_ledger[_before]`` on DB_DSN's server, dropped after),
migrated as `quota-gateway migrate` does:
1. ``--rows`` debits of one day (2027-03-10, UTC), ``--users`` users, two meters, written
   with generate_series into the ledger and its debit keys as the reconciler writes them
   (every index in place); then ANALYZE.
2. Bytes per row: pg_total_relation_size (heap, TOAST, indexes) of the month's partition
   over its rows, and of ledger_debit_keys over its rows.
3. The report of that day (reconciler/report.py, ``build``: totals, hourly chart, drift
   against an empty key prefix) and its two ledger queries alone, best of three.
4. The month rolled up and dropped (persistence/ledger.py, ``prune``), then the report of
   the same day again, from the rollups.
With ``--before``: the same rows in the unpartitioned ledger of migration 0011 (bytes per
row), then migration 0012 moving them (its time, and bytes per row after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from core.clock import FixedClock, to_ms
from core.settings import Settings
from persistence import ledger
from persistence.migrate import migrate
from persistence.plans import read_catalog_file, seed_missing
from quota.engine import make_engine
from reconciler import report

DB = "qg_bench_ledger"
PREFIX = "qgbenchledger"
DAY = date(2027, 3, 10)
LONG = 3600.0  # seconds: a query over every row of the day
START = datetime(2027, 3, 10, tzinfo=UTC)

FILL = """
INSERT INTO ledger (tx_id, kind, user_id, meter, amount_micro, from_allowance_micro,
                    from_credits_micro, period_id, ref, reason, caller, action, plan_code,
                    shard, stream_id, occurred_at, remaining_micro, ref_round)
SELECT md5(i::text)::uuid, 'debit', 'user-' || (i % $1), CASE WHEN i % 3 = 0 THEN 'template'
       ELSE 'chat' END, -1000000, 1000000, 0, 'd:2027-03-10', 'ref-' || md5(i::text), NULL,
       'chat-svc', CASE WHEN i % 3 = 0 THEN 'tpl_run' ELSE 'chat_tokens' END, 'free',
       i % 256, (1773100800000 + i) || '-0', $2::timestamptz + (i % 86400000) * interval '1 ms',
       1000000000, 0
FROM generate_series($3::bigint, $4::bigint) AS i
"""
KEYS = """
INSERT INTO ledger_debit_keys (user_id, ref, ref_round, tx_id, occurred_at)
SELECT user_id, ref, ref_round, tx_id, occurred_at FROM ledger
WHERE kind = 'debit' AND occurred_at >= $1 AND occurred_at < $2
"""


async def timed(action: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await action
    return time.perf_counter() - started, result


async def best_of(n: int, make: Any) -> float:
    times = []
    for _ in range(n):
        seconds, _ = await timed(make())
        times.append(seconds)
    return min(times)


async def measure(dsn: str, redis_url: str, rows: int, users: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    out: dict[str, Any] = {"rows": rows, "users": users, "day": DAY.isoformat()}
    try:
        await migrate(conn)
        await conn.fetchval("SELECT ledger_ensure_partitions($1, $1)", START)
        chunk = 1_000_000
        started = time.perf_counter()
        for first in range(0, rows, chunk):
            await conn.execute(FILL, users, START, first, min(rows, first + chunk) - 1)
        await conn.execute(KEYS, START, datetime(2027, 3, 11, tzinfo=UTC))
        fill_s = time.perf_counter() - started
        await conn.execute("ANALYZE")
        part = await conn.fetchval("SELECT pg_total_relation_size('ledger_flow_2027_03')")
        heap = await conn.fetchval("SELECT pg_relation_size('ledger_flow_2027_03')")
        keys = await conn.fetchval("SELECT pg_total_relation_size('ledger_debit_keys')")
        out |= {
            "fill_seconds": round(fill_s, 1),
            "ledger_bytes_per_row": round(part / rows, 1),
            "ledger_heap_bytes_per_row": round(heap / rows, 1),
            "debit_keys_bytes_per_row": round(keys / rows, 1),
            "total_bytes_per_debit": round((part + keys) / rows, 1),
        }
        print(json.dumps(out), flush=True)
    finally:
        await conn.close()

    settings = Settings(env="test", redis_url=redis_url, db_dsn=dsn, key_prefix=PREFIX,
                        n_shards=16)
    engine = make_engine(settings, FixedClock(to_ms(datetime(2027, 3, 11, 3, tzinfo=UTC))))
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await seed_missing(engine.db, read_catalog_file())
        end = datetime(2027, 3, 11, tzinfo=UTC)
        out["report_seconds"] = round(await best_of(3, lambda: report.build(engine, redis, DAY)),
                                      2)
        out["day_totals_seconds"] = round(await best_of(
            3, lambda: engine.db.fetch("day_totals", START, end, DAY, query_timeout=LONG)), 2)
        out["day_hourly_seconds"] = round(await best_of(
            3, lambda: engine.db.fetch("day_hourly", START, end, query_timeout=LONG)), 2)
        built = await report.build(engine, redis, DAY)
        now = datetime(2027, 5, 10, tzinfo=UTC)
        prune_s, dropped = await timed(ledger.prune(engine.db, now, 30, "UTC"))
        out["prune_seconds"] = round(prune_s, 1)
        out["pruned"] = dropped
        async with engine.db.connection() as conn:
            out["rollup_rows"] = await conn.fetchval("SELECT count(*) FROM ledger_daily")
        out["report_from_rollups_seconds"] = round(await best_of(
            3, lambda: report.build(engine, redis, DAY)), 2)
        after = await report.build(engine, redis, DAY)
        out["totals_equal_after_prune"] = after.totals == built.totals
        out["totals"] = built.totals
    finally:
        await redis.aclose()
        await engine.close()
    return out


def git_commit() -> str:
    """The commit measured (short hash)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()


async def measure_migration(dsn: str, rows: int, users: int) -> dict[str, Any]:
    """``--before``: the same rows in the unpartitioned ledger of migration 0011 (bytes per
    row), then migration 0012 over them (its time, and bytes per row after)."""
    conn = await asyncpg.connect(dsn)
    out: dict[str, Any] = {"rows": rows, "users": users, "before": True}
    try:
        await migrate(conn, until=11)
        for first in range(0, rows, 1_000_000):
            await conn.execute(FILL, users, START, first, min(rows, first + 1_000_000) - 1)
        await conn.execute("ANALYZE ledger")
        before = await conn.fetchval("SELECT pg_total_relation_size('ledger')")
        out["unpartitioned_ledger_bytes_per_row"] = round(before / rows, 1)
        seconds, _ = await timed(migrate(conn))
        out["migration_0012_seconds"] = round(seconds, 1)
        await conn.execute("ANALYZE")
        after = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('ledger')")
        keys = await conn.fetchval("SELECT pg_total_relation_size('ledger_debit_keys')")
        out["partitioned_ledger_bytes_per_row"] = round(int(after) / rows, 1)
        out["debit_keys_bytes_per_row"] = round(keys / rows, 1)
    finally:
        await conn.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--before", action="store_true",
                        help="measure the unpartitioned ledger and migration 0012 over it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    admin_dsn = os.environ.get("DB_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    name = DB + ("_before" if args.before else "")
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = admin_dsn.rsplit("/", 1)[0] + f"/{name}"
        result = await (measure_migration(dsn, args.rows, args.users) if args.before
                        else measure(dsn, redis_url, args.rows, args.users))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    commit = await asyncio.to_thread(git_commit)
    result = {"date": datetime.now(tz=UTC).date().isoformat(), "commit": commit,
              "command": "python -m bench.ledger " + " ".join(
                  f"--{k} {v}" for k, v in (("rows", args.rows), ("users", args.users)))
              + (" --before" if args.before else ""),
              "cpu_count": os.cpu_count()} | result
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
