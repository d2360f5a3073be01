"""Missing state is not zero usage: Redis rebuilt from the PostgreSQL ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from hotpath.quota import Engine
from hotpath.settings import Settings
from reconciler.main import Reconciler
from tests.support import apply_plan, balance_debit, debit, new_user, put_plan, unique_plan


@pytest.fixture
async def reconciler(engine: Engine, settings: Settings, raw_redis: aioredis.Redis
                     ) -> AsyncIterator[Reconciler]:
    """A reconciler on the test's prefix (drained by the test when it needs it)."""
    yield Reconciler(engine, raw_redis, name="test-consumer")


async def _wipe_user(raw_redis: aioredis.Redis, settings: Settings, user: str) -> int:
    keys = [k async for k in raw_redis.scan_iter(match=f"{settings.key_prefix}:*:u:{user}*")]
    return int(await raw_redis.delete(*keys)) if keys else 0


async def test_usage_survives_losing_the_users_redis_keys(
    client: httpx.AsyncClient, reconciler: Reconciler, raw_redis: aioredis.Redis,
    settings: Settings,
) -> None:
    """Debits flushed to PostgreSQL come back when the user's keys vanish from Redis."""
    user = new_user()
    plan = unique_plan()
    await put_plan(client, plan, {"units": {"limit": 100, "period": "month"},
                                  "chat": {"limit": 10, "period": "day"},
                                  "albums": {"limit": 3, "period": "none"}})
    await apply_plan(client, user, plan)
    assert (await balance_debit(client, user, 30.5)).status_code == 200
    assert (await debit(client, user, 4)).status_code == 200
    assert (await debit(client, user, 2, action="tpl_run")).status_code == 403
    await reconciler.drain()
    assert reconciler.stats.inserted == 2
    assert await _wipe_user(raw_redis, settings, user) >= 3  # state hash, two counters

    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["plan_code"] == plan
    assert check["meters"]["units"]["used"] == 30.5
    assert check["meters"]["units"]["remaining"] == 69.5
    assert check["meters"]["chat"]["remaining"] == 6
    # And the limits still hold after the rebuild.
    assert (await debit(client, user, 7)).status_code == 403
    assert (await debit(client, user, 6)).status_code == 200


async def test_redelivered_entries_are_written_once(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine,
) -> None:
    """Writing the same stream entries twice (a crash before XACK) adds nothing."""
    user = new_user()
    for _ in range(3):
        assert (await debit(client, user, 1)).status_code == 200
    await reconciler.consumer.ensure_groups()  # from id 0: entries added earlier count too
    entries = await reconciler.consumer.read()
    assert len(entries) == 3
    first = await reconciler.writer.write(entries)
    again = await reconciler.writer.write(entries)  # as if XACK had been lost
    assert (first.inserted, again.inserted, again.duplicates) == (3, 0, 3)
    await reconciler.consumer.done(entries)
    rows = await engine.db.fetch("user_usage", user, ["d:2026-11-23"])
    assert [(r["meter"], r["used_micro"]) for r in rows] == [("chat", 3_000_000)]
