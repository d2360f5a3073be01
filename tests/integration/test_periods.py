"""Period resets by TTL keys, plan expiry against the script's clock, callers' scopes."""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.events import unpack
from core.settings import Settings
from tests.support import (
    DAY_MS,
    HOUR_MS,
    T0,
    app_client,
    apply_plan,
    balance_debit,
    debit,
    new_user,
    put_plan,
    unique_plan,
)


async def test_daily_allowance_resets_at_midnight(client: httpx.AsyncClient, clock: FixedClock,
                                                  raw_redis: aioredis.Redis,
                                                  settings: Settings) -> None:
    """Used up at 23:59, fresh at 00:00 the next day; every counter key has a TTL."""
    user = new_user()
    clock.set(T0 + 11 * HOUR_MS + 59 * 60_000)  # 2026-11-23 23:59
    assert (await debit(client, user, 50)).status_code == 200
    assert (await debit(client, user, 1)).status_code == 403
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["chat"]["resets_at"] == "2026-11-24T00:00:00Z"
    clock.set(T0 + 12 * HOUR_MS)  # 2026-11-24 00:00
    fresh = await debit(client, user, 1)
    assert fresh.status_code == 200 and fresh.json()["remaining"] == 49
    counters = [k async for k in raw_redis.scan_iter(match=f"{settings.key_prefix}:*:c:*")]
    assert len(counters) == 2
    for key in counters:
        assert await raw_redis.pttl(key) > 0, key


async def test_monthly_allowance_resets_on_the_first(client: httpx.AsyncClient,
                                                     clock: FixedClock) -> None:
    """A plan's 750 units a calendar month: spent in November, back on 1 December."""
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"units": {"limit": 750, "period": "month"}})
    await apply_plan(client, user, plan, expires_at="2027-06-01T00:00:00Z")
    assert (await balance_debit(client, user, 750)).status_code == 200
    assert (await balance_debit(client, user, 1)).status_code == 403
    clock.set(T0 + 7 * DAY_MS + 12 * HOUR_MS - 1)  # 2026-11-30 23:59:59.999
    assert (await balance_debit(client, user, 1)).status_code == 403
    clock.advance(1)
    after = await balance_debit(client, user, 1)
    assert after.status_code == 200 and after.json()["balance"] == 749


async def test_expired_plan_falls_back_to_free_at_once(client: httpx.AsyncClient,
                                                       clock: FixedClock) -> None:
    """Past expires_at the script applies the free plan and the balance says expired."""
    user = new_user()
    plan = unique_plan()
    await put_plan(client, plan, {"units": {"limit": 100, "period": "month"}})
    await apply_plan(client, user, plan, expires_at="2026-11-23T13:00:00Z")
    assert (await balance_debit(client, user, 10)).status_code == 200
    clock.set(T0 + HOUR_MS)  # 13:00, the expiry
    response = await client.get("/internal/billing/balance", params={"user_id": user})
    assert response.json()["plan"] == {"plan_code": plan, "expires_at": "2026-11-23T13:00:00Z",
                                       "status": "expired"}
    assert response.json()["balance"] == 0  # free has no units
    assert (await balance_debit(client, user, 1)).status_code == 403
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["plan_code"] == "free" and check["plan_status"] == "expired"


async def test_plan_duration_sets_the_expiry(client: httpx.AsyncClient) -> None:
    """Without expires_at, pro_month runs 30 days from now (the test clock)."""
    user = new_user()
    response = await apply_plan(client, user, "pro_month")
    assert response.json()["expires_at"] == "2026-12-23T12:00:00Z"
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["remain_chat"] == 10000 and check["remain_tpl"] == 200


async def test_named_callers_are_limited_to_their_scopes(
    settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """Chat-svc's key debits but cannot change plans; its name is recorded with the debit."""
    from core.settings import Caller

    chat = Caller("chat-svc", "chat-key-0123456789", frozenset({"debit", "read"}))
    scoped = settings.with_overrides(callers=(chat,))
    async with app_client(scoped, clock, key=chat.key) as http:
        user = new_user()
        assert (await debit(http, user, 1)).status_code == 200
        denied = await http.post("/internal/billing/plan/apply",
                                 json={"user_id": user, "plan_code": "pro_month"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        keys = http.engine.keys  # type: ignore[attr-defined]
    entries = await raw_redis.xrange(keys.ledger(keys.shard(user)))
    events = [unpack(e[1]) for e in entries]
    assert [e["c"] for e in events if e["u"] == user] == ["chat-svc"]
