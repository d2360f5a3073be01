"""Allowances that follow the purchase (issue #18): a `cycle` meter grants its allowance
once per plan assignment, from its start for the plan's duration, afresh on renewal or
change, whatever month boundaries lie in between. Driven by the pinned clock the scripts
receive; no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock, to_ms
from persistence.plans import read_catalog_file
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import (
    CREDIT,
    DAY_MS,
    apply_plan,
    balance_debit,
    debit,
    new_ref,
    new_user,
    put_plan,
    unique_plan,
)


def at(iso: str) -> int:
    """An ISO time (UTC) as epoch ms."""
    return to_ms(datetime.fromisoformat(iso).replace(tzinfo=UTC))


async def remain(client: httpx.AsyncClient, user: str, meter: str = "chat") -> object:
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    return check["meters"][meter]["remaining"]


async def buy(client: httpx.AsyncClient, user: str, plan: str = "pro_month") -> None:
    """A purchase (Pay-svc's credit call): the plan for its duration from now."""
    response = await client.post(CREDIT, json={
        "order_id": new_ref(), "user_id": user, "plan_code": plan, "units_chat": 0,
        "units_tpl": 0})
    assert response.status_code == 200 and response.json()["applied"], response.text


async def test_a_plan_bought_on_the_20th_grants_one_allowance_across_the_month(
    client: httpx.AsyncClient, clock: FixedClock
) -> None:
    """pro_month bought on 20 December: its 10,000 chat units last until 19 January,
    through 1 January (which gave a second 10,000 before); a renewal grants a fresh one."""
    clock.set(at("2026-12-20T10:00:00"))
    user = new_user()
    await buy(client, user)
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["chat"]["period"] == "cycle"
    assert check["meters"]["chat"]["resets_at"] == "2027-01-19T10:00:00Z"  # the expiry
    assert (await debit(client, user, 10_000)).status_code == 200
    for day in ("2026-12-31T23:59:59", "2027-01-01T00:00:00", "2027-01-19T09:59:59"):
        clock.set(at(day))
        assert (await debit(client, user, 1)).status_code == 403, day
        assert await remain(client, user) == 0
    await buy(client, user)  # renewed before the expiry
    assert await remain(client, user) == 10_000
    assert (await debit(client, user, 1)).status_code == 200


async def test_a_renewal_and_a_plan_change_start_a_new_cycle(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine
) -> None:
    """Renewed mid-cycle: a fresh allowance from the renewal, counted under its own period
    id in the ledger; changed to base750 mid-cycle: base750's units, fresh."""
    clock.set(at("2027-02-10T08:00:00"))
    user = new_user()
    await buy(client, user)
    assert (await debit(client, user, 6_000)).status_code == 200
    clock.advance(5 * DAY_MS)
    await apply_plan(client, user, "pro_month")  # renewed (an operator's plan apply)
    assert await remain(client, user) == 10_000
    assert (await balance_debit(client, user, 1_999)).status_code == 200
    clock.advance(DAY_MS)
    await apply_plan(client, user, "base750")
    assert await remain(client, user, "units") == 750  # a new plan, a new cycle
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert "chat" not in check["meters"] or check["meters"]["chat"]["remaining"] == 0


async def test_cycle_usage_survives_redis_losing_its_data(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """3,000 of the cycle's chat spent and flushed; Redis loses every key of the user: the
    reload from PostgreSQL finds the cycle's usage (the ledger says period y:<version>)."""
    clock.set(at("2027-03-25T12:00:00"))
    user = new_user()
    await buy(client, user)
    assert (await debit(client, user, 3_000)).status_code == 200
    await Reconciler(engine, raw_redis, name="cycles").drain()
    async with engine.db.connection() as conn:
        periods = await conn.fetch(
            "SELECT period_id, used_micro FROM usage_counters WHERE user_id = $1", user)
        version = await conn.fetchval("SELECT version FROM user_plans WHERE user_id = $1", user)
    assert [(r["period_id"], r["used_micro"]) for r in periods] == [
        (f"y:{version}", 3_000_000_000)]
    keys = [k async for k in raw_redis.scan_iter(match=f"{engine.keys.user(user)}*")]
    assert await raw_redis.delete(*keys) >= 2  # the state and the cycle counter
    clock.set(at("2027-04-02T00:00:00"))  # a new calendar month: nothing resets
    assert await remain(client, user) == 7_000


async def test_a_meter_switched_to_cycle_keeps_months_for_earlier_assignments(
    client: httpx.AsyncClient, clock: FixedClock
) -> None:
    """A plan's monthly meter becomes a cycle on 15 May: a user assigned on 10 May keeps
    counting by month (1 June resets it, as promised when they bought); one assigned
    after the switch counts by cycle."""
    code = unique_plan()
    clock.set(at("2027-05-10T00:00:00"))
    await put_plan(client, code, {"chat": {"limit": 100, "period": "month"}})
    early, late = new_user(), new_user()
    await apply_plan(client, early, code)
    assert (await debit(client, early, 100)).status_code == 200
    clock.set(at("2027-05-15T00:00:00"))
    await put_plan(client, code, {"chat": {"limit": 100, "period": "cycle"}})
    assert (await debit(client, early, 1)).status_code == 403  # May's counter still holds
    await apply_plan(client, late, code)
    assert (await debit(client, late, 100)).status_code == 200
    clock.set(at("2027-06-01T00:00:00"))
    assert await remain(client, early) == 100  # by month: reset
    assert await remain(client, late) == 0  # by cycle (until 14 June): not


async def test_cycle_meters_need_a_duration(client: httpx.AsyncClient) -> None:
    """A plan without duration_days has no cycle to count in: 422 naming duration_days."""
    response = await client.put(f"/internal/billing/plans/{unique_plan()}", json={
        "meters": {"chat": {"limit": 1, "period": "cycle"}}, "duration_days": None,
        "price": "1.00", "currency": "RUB"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "duration_days"


async def test_no_shipped_plan_grants_an_allowance_twice_within_its_paid_duration(
    client: httpx.AsyncClient, clock: FixedClock, db_dsn: str
) -> None:
    """Every shipped plan with a duration, bought an hour before a month ends: every
    metered allowance spent at once stays spent, day by day, until the plan expires
    (credits none): never a second allowance within what was paid for."""
    conn = await asyncpg.connect(db_dsn)
    try:
        stored = {r["plan_code"] for r in await conn.fetch("SELECT plan_code FROM plans")}
    finally:
        await conn.close()
    plans = [p for p in read_catalog_file() if p.duration_days and p.plan_code in stored]
    assert {p.plan_code for p in plans} >= {"pro_month", "base750"}
    for plan in plans:
        clock.set(at("2027-07-31T23:00:00"))
        user = new_user()
        await buy(client, user, plan.plan_code)
        metered = {m: r for m, r in plan.meters.items()
                   if r.period in ("month", "cycle") and r.limit_micro}
        for meter, rule in metered.items():
            action_debit = await client.post("/internal/billing/debit", json={
                "user_id": user, "units": rule.limit_micro // 1_000_000, "ref": new_ref()}) \
                if meter == "units" else None
            if action_debit is not None:
                assert action_debit.status_code == 200, action_debit.text
        if "chat" in metered:
            assert (await debit(client, user, metered["chat"].limit_micro // 1_000_000)
                    ).status_code == 200
        expires = clock.now_ms() + plan.duration_days * DAY_MS
        while clock.now_ms() + DAY_MS < expires:
            clock.advance(DAY_MS)
            check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
            for meter in ("chat", "units"):
                if meter in metered:
                    assert check["meters"][meter]["remaining"] == 0, (plan.plan_code, meter,
                                                                      clock.now_ms())


async def test_a_cycle_without_an_expiry_counts_by_month(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """An assignment with no expiry has no end for a cycle counter's life (its TTL would
    be negative: the counter gone at once, a free reset): the meter counts by month."""
    clock.set(at("2027-08-10T00:00:00"))
    user = new_user()
    await buy(client, user)
    await remain(client, user)  # loaded
    await raw_redis.hset(engine.keys.user(user), "exp", "0")  # not reachable by the API
    assert (await debit(client, user, 7)).status_code == 200
    base = engine.keys.user(user)
    assert await raw_redis.get(f"{base}:c:chat:m:2027-08") == "7000000"
    assert [k async for k in raw_redis.scan_iter(match=f"{base}:c:chat:y:*")] == []


async def test_two_assignments_in_one_millisecond_are_two_cycles(
    client: httpx.AsyncClient, clock: FixedClock
) -> None:
    """Each assignment is its own cycle, even two of them in the same millisecond (a cycle
    is the assignment's version, not its start time)."""
    clock.set(at("2027-09-01T00:00:00"))
    user = new_user()
    await buy(client, user)
    assert (await debit(client, user, 10_000)).status_code == 200
    await apply_plan(client, user, "free")
    await apply_plan(client, user, "pro_month")  # the same pinned millisecond
    assert await remain(client, user) == 10_000
