"""With no reconciler, debits turn to 503 at the backlog limit while Redis memory stays
within its bound, and /ready and a metric say so (issue #17, defect 9).

The limit is a total over all shard streams sized to Redis's maxmemory (a quarter of it
at 256 B an entry, quota/backlog.py), each shard holding its share: a stopped reconciler
is noticed long before Redis runs out of memory."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from lua.replies import Status
from ops.devservers import EmbeddedRedis
from quota.backlog import ENTRY_BYTES, MEMORY_SHARE, backlog_total, per_shard
from quota.engine import Engine
from tests.support import (
    app_client,
    apply_plan,
    make_engine,
    new_ref,
    new_user,
    put_plan,
    read_metric,
    unique_plan,
)

MAXMEMORY = 32 * 1024 * 1024


@pytest.fixture
async def small_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A private Redis with maxmemory 32 MB and noeviction."""
    private = EmbeddedRedis(tmp_path / "redis")
    url = private.start()
    client = aioredis.Redis.from_url(url)
    await client.config_set("maxmemory", MAXMEMORY)
    await client.config_set("maxmemory-policy", "noeviction")
    await client.aclose()
    try:
        yield url
    finally:
        private.stop()


async def roomy_plan(http: httpx.AsyncClient, users: list[str]) -> None:
    """Give ``users`` a plan whose allowance no test here exhausts."""
    code = unique_plan()
    await put_plan(http, code, {"units": {"limit": 1_000_000, "period": "month"}})
    for user in users:
        await apply_plan(http, user, code)


def users_per_shard(engine: Engine, per: int) -> list[str]:
    """``per`` new users in every shard."""
    found: dict[int, list[str]] = {s: [] for s in range(engine.settings.n_shards)}
    while any(len(v) < per for v in found.values()):
        user = new_user()
        bucket = found[engine.keys.shard(user)]
        if len(bucket) < per:
            bucket.append(user)
    return [u for users in found.values() for u in users]


async def test_without_a_reconciler_debits_turn_503_at_the_limit_within_redis_memory(
    settings: Settings, clock: FixedClock, small_redis: str
) -> None:
    """Every shard accepts exactly its share of the total the maxmemory allows, then
    answers BACKLOG; Redis never refuses a write for memory, and its used memory stays under
    maxmemory; /ready answers 503 ``full`` and the backlog gauges show the total."""
    local = settings.with_overrides(redis_url=small_redis, max_backlog_entries=0)
    engine = make_engine(local, clock)
    try:
        await engine.check(new_user())  # connects: the guard learns maxmemory
        total = backlog_total(0, MAXMEMORY)
        assert total == int(MAXMEMORY * MEMORY_SHARE) // ENTRY_BYTES
        share = per_shard(total, local.n_shards)
        users = users_per_shard(engine, 2)
        async with app_client(local, clock) as http:
            await roomy_plan(http, users)
        results: Counter[Status] = Counter()

        async def hammer(user: str) -> None:
            for _ in range(share):  # two users a shard: twice what it may hold
                reply = await engine.debit(user, "units", 1, new_ref())
                results[reply.status] += 1

        await asyncio.gather(*(hammer(u) for u in users))
        assert results[Status.OK] == share * local.n_shards
        assert results[Status.BACKLOG] == share * local.n_shards
        assert set(results) == {Status.OK, Status.BACKLOG}
        raw = aioredis.Redis.from_url(small_redis)
        try:
            used = int((await raw.info("memory"))["used_memory"])
        finally:
            await raw.aclose()
        assert used < MAXMEMORY, used
    finally:
        await engine.close()

    async with app_client(local, clock) as http:
        ready = await http.get("/ready")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["ledger"].startswith("full: 16 shard streams")
        assert await read_metric(http, "quota_ledger_backlog_entries") == share * 16
        assert await read_metric(http, "quota_ledger_backlog_limit_entries") == share * 16


async def test_ready_says_when_the_flush_lags(
    settings: Settings, raw_redis: aioredis.Redis
) -> None:
    """An unflushed entry older than FLUSH_LAG_ALERT_SECONDS: /ready still answers 200 but
    says ``lagging``, and quota_ledger_oldest_seconds shows the age."""
    now_ms = time.time_ns() // 1_000_000
    clock = FixedClock(now_ms)
    local = settings.with_overrides(flush_lag_alert_seconds=60.0)
    async with app_client(local, clock) as http:
        user = new_user()
        await roomy_plan(http, [user])
        assert (await http.post("/internal/billing/debit", json={
            "user_id": user, "units": 1, "ref": new_ref()})).status_code == 200
        ready = await http.get("/ready")
        assert ready.json()["checks"]["ledger"] == "ok"
        clock.advance(120_000)  # nobody flushed for two minutes
        ready = await http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["ledger"].startswith("lagging: the oldest unflushed")
        assert 110 <= await read_metric(http, "quota_ledger_oldest_seconds") <= 130


async def test_debit_answers_503_backlog_full_through_the_api(
    settings: Settings, clock: FixedClock, small_redis: str
) -> None:
    """The refusal a caller sees: 503 with code backlog_full and Retry-After."""
    local = settings.with_overrides(redis_url=small_redis, max_backlog_entries=16)
    async with app_client(local, clock) as http:
        user = new_user()
        await roomy_plan(http, [user])
        first = await http.post("/internal/billing/debit",
                                json={"user_id": user, "units": 1, "ref": new_ref()})
        assert first.status_code == 200, first.text
        refused = await http.post("/internal/billing/debit",
                                  json={"user_id": user, "units": 1, "ref": new_ref()})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "backlog_full"
        assert refused.headers["retry-after"] == "1"


def test_the_limit_is_a_total_sized_to_memory() -> None:
    """Configured totals win; else a quarter of maxmemory at 256 B an entry; else 2
    million; each of N shards holds total // N (at least one)."""
    assert backlog_total(500, 10**9) == 500
    assert backlog_total(0, 1024 * 1024 * 1024) == 1024 * 1024 * 1024 // 4 // 256
    assert backlog_total(0, 0) == 2_000_000
    assert per_shard(2_000_000, 256) == 7812
    assert per_shard(3, 16) == 1


