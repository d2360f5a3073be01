"""Reads of never-seen user ids cost no lasting Redis memory (issue #17, defect 6): a user
PostgreSQL holds nothing of is loaded for UNKNOWN_USER_TTL_SECONDS only, and its first
debit, credit or plan gives it the full USER_STATE_TTL_SECONDS."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from core.settings import Settings
from quota.engine import Engine
from tests.support import CREDIT, apply_plan, debit, new_ref, new_user

DAY_MS = 86_400_000


async def ttl_ms(raw_redis: aioredis.Redis, key: str) -> int:
    value: int = await raw_redis.pttl(key)
    return value


async def test_checks_of_never_seen_ids_stay_briefly(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, raw_redis: aioredis.Redis
) -> None:
    """200 never-seen ids checked through both read routes: each answers the default plan,
    and each user hash lives at most UNKNOWN_USER_TTL_SECONDS (not the 30-day state TTL)."""
    users = [new_user() for _ in range(200)]
    for i, user in enumerate(users):
        if i % 2:
            response = await client.get(f"/internal/billing/quota/check/{user}")
            assert response.json()["plan_code"] == "free"
        else:
            response = await client.get("/internal/billing/balance", params={"user_id": user})
        assert response.status_code == 200, response.text
    short = settings.unknown_user_ttl_seconds * 1000
    ttls = [await ttl_ms(raw_redis, engine.keys.user(u)) for u in users]
    assert all(0 < t <= short for t in ttls), sorted(ttls)[-3:]


async def test_a_debit_credit_or_plan_gives_a_brief_user_the_full_ttl(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, raw_redis: aioredis.Redis
) -> None:
    """After a check loaded them briefly: a debit, a credit and a plan apply each set the
    full state TTL; a user PostgreSQL knows is loaded with the full TTL by a check."""
    full = settings.user_state_ttl_seconds * 1000
    debited, credited, planned = new_user(), new_user(), new_user()
    for user in (debited, credited, planned):
        await client.get(f"/internal/billing/quota/check/{user}")
    assert (await debit(client, debited, 1)).status_code == 200
    response = await client.post(CREDIT, json={
        "order_id": new_ref(), "user_id": credited, "plan_code": "free", "units_chat": 5,
        "units_tpl": 0, "amount": 0})
    assert response.status_code == 200 and response.json()["applied"], response.text
    await apply_plan(client, planned, "pro_month")
    for user in (debited, credited, planned):
        assert await ttl_ms(raw_redis, engine.keys.user(user)) > full - DAY_MS, user

    # Redis forgets them: a check reloads each, known to PostgreSQL now, for the full TTL
    await raw_redis.delete(*(engine.keys.user(u) for u in (credited, planned)))
    for user in (credited, planned):
        assert (await client.get(f"/internal/billing/quota/check/{user}")).status_code == 200
        assert await ttl_ms(raw_redis, engine.keys.user(user)) > full - DAY_MS, user
