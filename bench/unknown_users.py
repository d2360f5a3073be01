"""Redis memory left by reads of never-seen user ids (issue #17, defect 6).

``Engine.check`` of N random ids a PostgreSQL database holds nothing of, on a private
redis-server, with UNKNOWN_USER_TTL_SECONDS set to ``--ttl``. ``INFO memory`` ``used_memory``
is read before (M0), right after the checks (M1) and once the TTL has passed (M2, after a
SCAN so that every expired key is gone): (M1 - M0) / N is what a never-seen id costs while
it stays, (M2 - M0) / N what it costs for good. Before issue #17 each id stayed for the
30-day state TTL, so M2 equalled M1.

Usage (needs a migrated database)::

    python -m bench.unknown_users --db-dsn postgresql://postgres@127.0.0.1:5432/qg_bench \\
        --ids 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import redis

from bench.memory import private_redis
from core.settings import load_settings
from quota.engine import Engine, make_engine


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _engine(redis_url: str, db_dsn: str, ttl: int, prefix: str) -> Engine:
    return make_engine(load_settings({
        "REDIS_URL": redis_url, "DB_DSN": db_dsn, "KEY_PREFIX": prefix,
        "UNKNOWN_USER_TTL_SECONDS": str(ttl), "DB_POOL_MAX": "20"}))


async def _copy_catalog(engine: Engine) -> None:
    try:
        await engine.loader.sync_catalog()
    finally:
        await engine.close()


async def _check_all(engine: Engine, ids: int, concurrency: int) -> float:
    queue = [f"never-{uuid.uuid4().hex}" for _ in range(ids)]

    async def worker() -> None:
        while queue:
            await engine.check(queue.pop())

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await engine.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db-dsn", default="postgresql://postgres@127.0.0.1:5432/qg_bench")
    parser.add_argument("--ids", type=int, default=100_000)
    parser.add_argument("--ttl", type=int, default=120,
                        help="UNKNOWN_USER_TTL_SECONDS (longer than the checks take)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefix", default="qg")
    args = parser.parse_args()
    with private_redis() as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        asyncio.run(_copy_catalog(_engine(url, args.db_dsn, args.ttl, args.prefix)))
        m0 = _used(client)
        seconds = asyncio.run(_check_all(_engine(url, args.db_dsn, args.ttl, args.prefix),
                                         args.ids, args.concurrency))
        m1 = _used(client)
        keys_while = client.dbsize()
        time.sleep(args.ttl + 1)
        for _ in client.scan_iter(count=5000):  # touch every key: expired ones go now
            pass
        m2 = _used(client)
        result = {
            "ids": args.ids, "ttl_seconds": args.ttl,
            "checks_per_second": round(args.ids / seconds),
            "keys_while_staying": keys_while, "keys_after_ttl": client.dbsize(),
            "bytes_per_id_while_staying": round((m1 - m0) / args.ids, 1),
            "bytes_per_id_after_ttl": round((m2 - m0) / args.ids, 2),
            "used_memory": {"before": m0, "after_checks": m1, "after_ttl": m2},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
