"""Redis memory per remembered ref (#20): growth of ``used_memory`` per debit, streams drained.

On a private redis-server: ``users`` users get the ``bench`` plan (bench/memory.py) and one
debit each (which loads them), the ledger streams are deleted and ``used_memory`` read
(M0); then ``refs`` debits in all, each with a new UUID4 ref, go through the real
``Engine.debit``, round-robin over the users (so each user's refs share its idempotency
buckets), the streams are deleted again (what the reconciler does once they are flushed)
and ``used_memory`` read (M1). Bytes per remembered ref = (M1 - M0) / refs. It runs the
same against the layout of any build whose ``Engine.debit`` has this signature (the
"before" figure: this file copied into an export of the older commit).

    python -m bench.refs_memory --db-dsn postgresql://postgres@127.0.0.1:5432/qg_bench \\
        --users 10000 --refs 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import msgspec
import redis

from bench.memory import BENCH_PLAN, _delete, _used, private_redis, redis_binary
from core.amounts import decode_hook
from core.settings import load_settings
from persistence.plans import PlanBody, validate_plan
from quota.engine import make_engine


async def _measure(redis_url: str, db_dsn: str, users: int, refs: int, prefix: str,
                   concurrency: int) -> dict[str, Any]:
    settings = load_settings({}).with_overrides(
        redis_url=redis_url, db_dsn=db_dsn, key_prefix=prefix, db_pool_max=concurrency)
    engine = make_engine(settings)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        plan = validate_plan("bench", msgspec.convert(BENCH_PLAN, PlanBody, dec_hook=decode_hook))
        await engine.plans.put_and_sync(plan, "bench")
        ids = [f"m{i:07d}" for i in range(users)]
        gate = asyncio.Semaphore(concurrency)

        async def debit(user_id: str) -> None:
            async with gate:
                reply = await engine.debit(user_id, "chat", 1_000_000, str(uuid.uuid4()),
                                           caller="service", action="chat_tokens")
                if reply.status.name != "OK":
                    raise RuntimeError(f"debit of {user_id} answered {reply.status.name}")

        async def apply(user_id: str) -> None:
            async with gate:
                await engine.plans.apply(user_id, "bench", None, "bench")

        await asyncio.gather(*(apply(u) for u in ids))
        await asyncio.gather(*(debit(u) for u in ids))
        _delete(client, f"{prefix}:*:ledger")
        client.execute_command("MEMORY", "PURGE")
        m0 = _used(client)
        started = time.monotonic()
        step = 50_000
        for start in range(0, refs, step):
            await asyncio.gather(*(debit(ids[i % users])
                                   for i in range(start, min(refs, start + step))))
            _delete(client, f"{prefix}:*:ledger")  # drained as they go
        seconds = time.monotonic() - started
        client.execute_command("MEMORY", "PURGE")
        m1 = _used(client)
        encodings: dict[str, int] = {}
        for key in client.scan_iter(match=f"{prefix}:*:r*", count=2000):
            enc = str(client.object("encoding", key))
            encodings[enc] = encodings.get(enc, 0) + 1
    finally:
        client.close()
        await engine.close()
    return {
        "users": users, "refs": refs, "refs_per_user": refs / users,
        "ref_example": "a UUID4 string (36 characters)", "user_id_example": ids[0],
        "key_prefix": prefix, "fill_seconds": round(seconds, 1),
        "debits_per_second_in_process": round(refs / seconds),
        "used_memory": {"m0_users_loaded": m0, "m1_after_refs": m1},
        "bytes_per_ref": round((m1 - m0) / refs, 1),
        "ref_key_encodings": encodings,
        "idempotency_ttl_seconds": settings.idempotency_ttl_seconds,
    }


def measure(db_dsn: str, users: int, refs: int, prefix: str = "qg", concurrency: int = 64,
            binary: str | None = None) -> dict[str, Any]:
    """Run the measurement against a private redis-server; returns the figures."""
    with private_redis(binary) as url:
        result = asyncio.run(_measure(url, db_dsn, users, refs, prefix, concurrency))
        client = redis.Redis.from_url(url, decode_responses=True)
        result["redis_version"] = client.info("server").get("redis_version")
        result["allocator"] = client.info("memory").get("mem_allocator")
        client.close()
    result["redis_binary"] = binary or redis_binary()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db-dsn", default="postgresql://postgres@127.0.0.1:5432/qg_bench")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--refs", type=int, default=1_000_000)
    parser.add_argument("--prefix", default="qg")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-server", default=None, help="redis-server binary to run")
    args = parser.parse_args()
    print(json.dumps(measure(args.db_dsn, args.users, args.refs, args.prefix,
                             args.concurrency, args.redis_server), indent=2))


if __name__ == "__main__":
    main()
