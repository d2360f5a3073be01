"""Upgrading from a build that remembered refs as `<user>:r:<ref>` strings (before the ref
buckets): `quota-gateway refs convert` (ops/upgrade.py) puts each flushed debit into its
bucket, so a retry still answers 409 with the original debit; an unflushed one waits."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from ops.upgrade import convert_legacy_refs
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import debit, new_ref, new_user


async def _as_old_build(raw_redis: aioredis.Redis, engine: Engine, user: str, ref: str,
                        tx_id: str, remaining: str) -> str:
    """Replace the user's buckets by the string an old build left for (user, ref)."""
    buckets = [k async for k in raw_redis.scan_iter(match=f"{engine.keys.refs(user)}:*")]
    if buckets:
        await raw_redis.unlink(*buckets)
    key = f"{engine.keys.user(user)}:r:{ref}"
    await raw_redis.set(key, f"chat:1000000:\n{tx_id}\n{remaining}", px=3_600_000)
    return key


async def test_old_ref_strings_are_converted_and_retries_still_answer_409(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    user, ref, unflushed_ref = new_user(), new_ref(), new_ref()
    first = (await debit(client, user, 1, ref)).json()
    await Reconciler(engine, raw_redis, name="refs-upgrade").drain()
    old = await _as_old_build(raw_redis, engine, user, ref, first["tx_id"],
                              str(first["remaining"] * 1_000_000))
    waiting = f"{engine.keys.user(user)}:r:{unflushed_ref}"
    await raw_redis.set(waiting, "chat:1000000:\n0190a1b2-c3d4-7e5f-8a9b-0123456789ab\n1",
                        px=3_600_000)

    done = await convert_legacy_refs(engine, raw_redis)
    assert (done.converted, done.waiting) == (1, [waiting])
    assert await raw_redis.exists(old) == 0 and await raw_redis.exists(waiting) == 1
    retry = await debit(client, user, 1, ref)
    assert retry.status_code == 409, retry.text
    assert (retry.json()["tx_id"], retry.json()["remaining"]) == (first["tx_id"],
                                                                  first["remaining"])
    assert (await convert_legacy_refs(engine, raw_redis)).converted == 0  # nothing new


async def test_without_the_conversion_a_retry_of_an_old_debit_is_debited_again(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """Why the conversion exists: the scripts read only the buckets."""
    user, ref = new_user(), new_ref()
    first = (await debit(client, user, 1, ref)).json()
    await _as_old_build(raw_redis, engine, user, ref, first["tx_id"], "49000000")
    again = await debit(client, user, 1, ref)
    assert again.status_code == 200 and again.json()["tx_id"] != first["tx_id"]
