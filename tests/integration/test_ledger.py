"""The ledger as callers and operators see it: transactions, backlog refusal."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import app_client, apply_plan, balance_debit, debit, new_user


async def test_transactions_newest_first_paginated(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis, clock: FixedClock
) -> None:
    """Five debits and a plan change, flushed, come back newest first in pages of two."""
    user = new_user()
    await apply_plan(client, user, "base750", expires_at="2027-01-01T00:00:00Z")
    for i in range(5):
        clock.advance(1000)
        assert (await balance_debit(client, user, 1.5, reason=f"r{i}")).status_code == 200
    await Reconciler(engine, raw_redis, name="tx-test").drain()
    seen, before = [], None
    for _ in range(4):
        params = {"user_id": user, "limit": "2", **({"before": before} if before else {})}
        page = (await client.get("/internal/billing/transactions", params=params)).json()
        seen += page["transactions"]
        before = page["next_before"]
        if before is None:
            break
    assert [t["kind"] for t in seen] == ["debit"] * 5 + ["plan"]
    assert [t["reason"] for t in seen[:5]] == ["r4", "r3", "r2", "r1", "r0"]
    assert {t["amount"] for t in seen[:5]} == {-1.5}
    assert seen[0]["from_allowance"] == 1.5 and seen[0]["caller"] == "service"
    bad = await client.get("/internal/billing/transactions",
                           params={"user_id": user, "limit": "0"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "limit"


async def test_debits_are_refused_past_the_backlog_limit(
    settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """With the shard stream at its limit, a debit is 503 and leaves nothing behind."""
    small = settings.with_overrides(max_backlog_entries=3, n_shards=1)
    async with app_client(small, clock) as http:
        engine = http.engine  # type: ignore[attr-defined]
        user = new_user()
        for _ in range(3):
            assert (await debit(http, user, 1)).status_code == 200
        refused = await debit(http, user, 1)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "backlog_full"
        assert await raw_redis.xlen(engine.keys.ledger(0)) == 3
        check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert check["remain_chat"] == 47
        await Reconciler(engine, raw_redis, name="backlog-test").drain()
        assert (await debit(http, user, 1)).status_code == 200  # drained: accepted again
