"""Reservations (issue #21): reserve an estimate, settle the actual cost, release, extend;
holds expire by the scripts' clock (no sleeping), every change is a ledger event, and a
Redis data loss brings the same holds back. Against the real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import (
    apply_plan,
    debit,
    new_ref,
    new_user,
    put_plan,
    read_metric,
    unique_plan,
)

Q = "/internal/billing/quota"


async def reserve(client: httpx.AsyncClient, user: str, units: Any, *, ref: str | None = None,
                  ttl_s: Any = 60, **extra: Any) -> httpx.Response:
    body = {"user_id": user, "units": units, "ref": ref or new_ref(), "ttl_s": ttl_s, **extra}
    if "meter" not in body:
        body.setdefault("action", "chat_tokens")
    return await client.post(f"{Q}/reserve", json=body)


async def hold(client: httpx.AsyncClient, user: str, units: Any, **extra: Any) -> str:
    response = await reserve(client, user, units, **extra)
    assert response.status_code == 200, response.text
    return str(response.json()["hold_id"])


async def settle(client: httpx.AsyncClient, hold_id: str, units: Any, **extra: Any
                 ) -> httpx.Response:
    return await client.post(f"{Q}/settle", json={"hold_id": hold_id, "units": units, **extra})


async def release(client: httpx.AsyncClient, hold_id: str) -> httpx.Response:
    return await client.post(f"{Q}/release", json={"hold_id": hold_id})


async def meter(client: httpx.AsyncClient, user: str, name: str = "chat") -> dict[str, Any]:
    response = await client.get(f"{Q}/check/{user}")
    assert response.status_code == 200, response.text
    return dict(response.json()["meters"][name])


async def overdraft_plan(client: httpx.AsyncClient, limit: int = 100, overdraft: int = 20
                         ) -> str:
    code = unique_plan()
    # an existing meter name: a new one would show up in every other test's full check
    await put_plan(client, code, {"chat": {"limit": limit, "period": "day",
                                           "overdraft": overdraft}})
    return code


async def test_reserve_then_settle_debits_the_actual_and_gives_back_the_rest(
    client: httpx.AsyncClient
) -> None:
    user = new_user()  # the free plan: 50 chat a day
    response = await reserve(client, user, 20)
    assert response.status_code == 200, response.text
    held = response.json()
    assert held["remaining"] == 30 and held["meter"] == "chat" and held["units"] == 20
    assert held["expires_at"] == "2026-11-23T12:01:00Z"  # T0 + 60 s
    view = await meter(client, user)
    assert (view["held"], view["remaining"], view["used"]) == (20, 30, 0)
    # a debit cannot take what the hold keeps
    assert (await debit(client, user, 31)).status_code == 403
    assert (await debit(client, user, 30)).status_code == 200

    done = await settle(client, held["hold_id"], "12.5")
    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["settled"], body["released"], body["from_allowance"]) == (12.5, 7.5, 12.5)
    assert body["remaining"] == 7.5  # 50 - 30 - 12.5
    view = await meter(client, user)
    assert (view["held"], view["used"], view["remaining"]) == (0, 42.5, 7.5)
    # a repeat answers the first result and debits nothing more
    again = await settle(client, held["hold_id"], 1)
    assert again.status_code == 200 and again.json() == body
    assert (await meter(client, user))["remaining"] == 7.5


async def test_a_retried_reserve_answers_the_original_hold(client: httpx.AsyncClient) -> None:
    user, ref = new_user(), new_ref()
    first = await reserve(client, user, 10, ref=ref)
    second = await reserve(client, user, 10, ref=ref)
    assert second.status_code == 409
    assert second.json()["hold_id"] == first.json()["hold_id"]
    assert second.json()["remaining"] == 40
    other = await reserve(client, user, 11, ref=ref)  # same ref, another request
    assert other.status_code == 422 and other.json()["error"]["code"] == "ref_reused"
    as_debit = await debit(client, user, 10, ref=ref)  # refs are shared with debits
    assert as_debit.status_code == 422
    assert (await meter(client, user))["held"] == 10


async def test_closed_holds_answer_with_their_own_codes(
    client: httpx.AsyncClient, clock: FixedClock
) -> None:
    user = new_user()
    released = await hold(client, user, 5)
    answer = await release(client, released)
    assert answer.status_code == 200 and answer.json()["released"] == 5
    assert (await release(client, released)).json() == answer.json()  # a repeat: the same
    refused = await settle(client, released, 1)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "hold_released"

    settled = await hold(client, user, 5)
    assert (await settle(client, settled, 5)).status_code == 200
    late = await release(client, settled)
    assert late.status_code == 409 and late.json()["error"]["code"] == "hold_settled"

    expiring = await hold(client, user, 5, ttl_s=10)
    clock.advance(10_000)
    gone = await settle(client, expiring, 5)
    assert gone.status_code == 409 and gone.json()["error"]["code"] == "hold_expired"
    extend = await client.post(f"{Q}/extend", json={"hold_id": expiring, "ttl_s": 5})
    assert extend.status_code == 409 and extend.json()["error"]["code"] == "hold_expired"

    unknown = await settle(client, "0" * 32 + ".dXNlcg", 1)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "hold_not_found"
    view = await meter(client, user)
    assert (view["used"], view["held"], view["remaining"]) == (5, 0, 45)


async def test_extend_pushes_the_expiry_within_the_maximum(
    client: httpx.AsyncClient, clock: FixedClock
) -> None:
    user = new_user()
    hold_id = await hold(client, user, 5, ttl_s=10)
    clock.advance(9_000)
    pushed = await client.post(f"{Q}/extend", json={"hold_id": hold_id, "ttl_s": 30})
    assert pushed.status_code == 200, pushed.text
    assert pushed.json()["expires_at"] == "2026-11-23T12:00:39Z"
    shorter = await client.post(f"{Q}/extend", json={"hold_id": hold_id, "ttl_s": 1})
    assert shorter.json()["expires_at"] == "2026-11-23T12:00:39Z"  # never earlier
    too_long = await client.post(f"{Q}/extend", json={"hold_id": hold_id, "ttl_s": 3601})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "ttl_s"
    clock.advance(20_000)  # past the first expiry, before the new one
    assert (await meter(client, user))["held"] == 5
    assert (await settle(client, hold_id, 5)).status_code == 200


async def test_bad_reserves_are_refused_naming_the_field(client: httpx.AsyncClient) -> None:
    user = new_user()
    cases = [
        ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": 3601}, "ttl_s"), ({"ttl_s": "0.0001"}, "ttl_s"),
        ({"meter": "chat", "action": "chat_tokens"}, "action"), ({"action": "nope"}, "action"),
    ]
    for extra, field in cases:
        response = await reserve(client, user, 5, **extra)
        assert response.status_code == 422, (extra, response.text)
        assert response.json()["error"]["field"] == field, (extra, response.text)
    neither = await client.post(f"{Q}/reserve", json={"user_id": user, "units": 5,
                                                      "ref": new_ref()})
    assert neither.status_code == 422
    assert (await reserve(client, user, 51)).status_code == 403
    by_meter = await client.post(f"{Q}/reserve", json={"user_id": user, "units": 5,
                                                       "ref": new_ref(), "meter": "chat"})
    assert by_meter.status_code == 200, by_meter.text
    assert (await meter(client, user))["held"] == 5


async def test_too_many_open_holds_is_a_409(client: httpx.AsyncClient, engine: Engine) -> None:
    user = new_user()
    most = engine.settings.hold_max_open
    for _ in range(most):
        await hold(client, user, "0.01")
    refused = await reserve(client, user, "0.01")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "too_many_holds"


async def test_200_concurrent_reserves_against_a_balance_that_fits_50(
    client: httpx.AsyncClient
) -> None:
    user = new_user()  # 50 chat units: 50 holds of one fit
    answers = await asyncio.gather(*(reserve(client, user, 1) for _ in range(200)))
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 50 and codes.count(403) == 150, codes
    view = await meter(client, user)
    assert (view["held"], view["remaining"]) == (50, 0)


async def test_debits_and_holds_interleaved_never_take_the_free_balance_below_zero(
    client: httpx.AsyncClient
) -> None:
    user = new_user()

    async def one(i: int) -> tuple[str, int, Any]:
        if i % 3 == 0:
            return "debit", (await debit(client, user, 3)).status_code, 3
        response = await reserve(client, user, 4)
        return "hold", response.status_code, response.json().get("hold_id")

    outcomes = await asyncio.gather(*(one(i) for i in range(60)))
    debited = sum(3 for kind, code, _ in outcomes if kind == "debit" and code == 200)
    holds = [h for kind, code, h in outcomes if kind == "hold" and code == 200]
    assert debited + 4 * len(holds) <= 50
    assert 50 - (debited + 4 * len(holds)) < 4  # refused only when nothing fitted
    # settle every hold at more than its estimate: only what is free is taken
    settles = await asyncio.gather(*(settle(client, h, 6, partial=True) for h in holds))
    taken = sum(s.json()["settled"] for s in settles)
    view = await meter(client, user)
    assert view["used"] == debited + taken <= 50
    assert view["remaining"] == 50 - view["used"] and view["held"] == 0


async def test_overdraft_bounds_a_settle_past_what_is_free_under_concurrency(
    client: httpx.AsyncClient
) -> None:
    """Ten holds keep all 100 units of a meter whose plan allows an overdraft of 20, and all
    settle at once at 15 (50 more than held). A settle may take past its estimate only what
    is free beside the other holds plus the overdraft, so the other holds' estimates stay
    covered: four settle at 15, six are refused with 10 available (their own estimate), and
    the meter ends at most 20 past its allowance, whatever the order."""
    plan = await overdraft_plan(client, limit=100, overdraft=20)
    user = new_user()
    await apply_plan(client, user, plan)
    holds = [await hold(client, user, 10, meter="chat") for _ in range(10)]
    answers = await asyncio.gather(*(settle(client, h, 15) for h in holds))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 4 + [403] * 6, codes
    refused = [a.json() for a in answers if a.status_code == 403]
    for body in refused:
        assert body["error"]["code"] == "insufficient_quota" and body["available"] == 10
    assert (await meter(client, user, "chat"))["used"] == 60  # a refusal debits nothing
    partial = await asyncio.gather(*(settle(client, body["hold_id"], 15, partial=True)
                                     for body in refused))
    assert [p.json()["settled"] for p in partial] == [10] * 6
    view = await meter(client, user, "chat")
    assert (view["used"], view["remaining"], view["held"]) == (120, 0, 0)
    assert (await client.post("/internal/billing/quota/reserve", json={
        "user_id": user, "meter": "chat", "units": 1, "ref": new_ref()})).status_code == 403


async def test_without_overdraft_a_settle_takes_no_more_than_is_free(
    client: httpx.AsyncClient
) -> None:
    user = new_user()
    hold_id = await hold(client, user, 40)
    assert (await debit(client, user, 8)).status_code == 200  # 2 free beside the hold
    refused = await settle(client, hold_id, 43)
    assert refused.status_code == 403 and refused.json()["available"] == 42
    taken = await settle(client, hold_id, 42)
    assert taken.status_code == 200 and taken.json()["remaining"] == 0


async def test_expiry_by_the_script_clock_frees_the_units_and_reaches_the_ledger(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    user = new_user()
    hold_id = await hold(client, user, 30, ttl_s=5)
    clock.advance(4_999)
    assert (await debit(client, user, 21)).status_code == 403  # still held
    clock.advance(1)
    view = await meter(client, user)  # a read sees it expired (writes nothing)
    assert (view["held"], view["remaining"]) == (0, 50)
    assert (await debit(client, user, 21)).status_code == 200  # the debit expires it first
    await Reconciler(engine, raw_redis, name="holds").drain()
    async with engine.db.connection() as conn:
        rows = await conn.fetch("SELECT kind, amount_micro, occurred_at FROM ledger "
                                "WHERE user_id = $1 AND ref = $2 ORDER BY occurred_at",
                                user, hold_id)
        state = await conn.fetchrow("SELECT state, closed_at, expires_at FROM holds "
                                    "WHERE hold_id = $1", hold_id)
    assert [r["kind"] for r in rows] == ["hold", "expiry"]
    assert all(r["amount_micro"] == 0 for r in rows)
    assert state["state"] == "expired" and state["closed_at"] == state["expires_at"]


async def test_the_reconciler_expires_the_holds_of_idle_users(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    user = new_user()
    hold_id = await hold(client, user, 30, ttl_s=5)
    clock.advance(6_000)
    assert await engine.holds.sweep() == 1
    assert await engine.holds.sweep() == 0  # once
    await Reconciler(engine, raw_redis, name="sweep").drain()
    async with engine.db.connection() as conn:
        state = await conn.fetchval("SELECT state FROM holds WHERE hold_id = $1", hold_id)
        kinds = await conn.fetch("SELECT kind FROM ledger WHERE ref = $1", hold_id)
    assert state == "expired" and sorted(r["kind"] for r in kinds) == ["expiry", "hold"]
    view = await meter(client, user)
    assert (view["held"], view["remaining"]) == (0, 50)


async def _lose_redis(raw_redis: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in raw_redis.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await raw_redis.unlink(*keys)


async def test_a_redis_data_loss_brings_back_the_same_holds(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis,
    settings: Any
) -> None:
    user, ref = new_user(), new_ref()
    open_id = (await reserve(client, user, 20, ref=ref, ttl_s=120)).json()["hold_id"]
    settled_id = await hold(client, user, 10)
    first = (await settle(client, settled_id, 4)).json()
    released_id = await hold(client, user, 3)
    await release(client, released_id)
    assert (await debit(client, user, 6)).status_code == 200
    before = await meter(client, user)
    assert (before["held"], before["used"], before["remaining"]) == (20, 10, 20)
    await Reconciler(engine, raw_redis, name="before-loss").drain()

    await _lose_redis(raw_redis, settings.key_prefix)
    after = await meter(client, user)  # loaded from PostgreSQL
    assert (after["held"], after["used"], after["remaining"]) == (20, 10, 20)
    # the same hold, the same expiry: a retried reserve answers it, it expires on time
    retry = await reserve(client, user, 20, ref=ref, ttl_s=120)
    assert retry.status_code == 409 and retry.json()["hold_id"] == open_id
    assert (await settle(client, settled_id, 9)).json() == first  # the first result
    gone = await settle(client, released_id, 1)
    assert gone.json()["error"]["code"] == "hold_released"
    clock.advance(119_999)
    assert (await meter(client, user))["held"] == 20
    clock.advance(1)
    assert (await meter(client, user))["held"] == 0
    assert (await debit(client, user, 40)).status_code == 200
    await Reconciler(engine, raw_redis, name="after-loss").drain()  # no hold left open


async def test_a_user_whose_state_left_redis_with_open_holds_gets_them_expired(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis,
    settings: Any
) -> None:
    """Redis lost the state of a user with an open hold and no request comes: the
    reconciler loads the user from PostgreSQL, and the hold expires with its event."""
    user = new_user()
    hold_id = await hold(client, user, 20, ttl_s=5)
    reconciler = Reconciler(engine, raw_redis, name="overdue")
    await reconciler.drain()
    await _lose_redis(raw_redis, settings.key_prefix)
    clock.advance(10 * 60_000)
    assert await reconciler.expire_holds() >= 1
    await reconciler.drain()
    async with engine.db.connection() as conn:
        state = await conn.fetchval("SELECT state FROM holds WHERE hold_id = $1", hold_id)
    assert state == "expired"


async def test_check_and_the_spec_show_holds(client: httpx.AsyncClient) -> None:
    user = new_user()
    await hold(client, user, "2.5")
    view = await meter(client, user)
    assert view["held"] == 2.5 and Decimal(str(view["remaining"])) == Decimal("47.5")
    spec = (await client.get("/openapi.json")).json()
    for path in ("reserve", "settle", "release", "extend"):
        assert f"{Q}/{path}" in spec["paths"]
    ttl = spec["components"]["schemas"]["ExtendIn"]["properties"]["ttl_s"]
    assert ttl["maximum"] == 3600


async def test_holds_are_counted_by_outcome_without_user_ids(
    client: httpx.AsyncClient, clock: FixedClock, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """quota_holds_total{meter, outcome}: created, settled and released by the service,
    expired by the reconciler as it writes the expiry; quota_open_holds from PostgreSQL."""
    outcomes = ("created", "settled", "released", "expired")

    async def counts() -> dict[str, float]:
        return {o: await read_metric(client, "quota_holds_total", meter="chat", outcome=o)
                for o in outcomes}

    before = await counts()
    user = new_user()
    await settle(client, await hold(client, user, 2), 1)
    await release(client, await hold(client, user, 2))
    await hold(client, user, 2, ttl_s=1)
    still_open = await hold(client, user, 2, ttl_s=30)
    await settle(client, still_open, 100)  # refused: not counted
    clock.advance(1_000)
    reconciler = Reconciler(engine, raw_redis, name="holds-metrics")
    await reconciler.expire_holds()
    await reconciler.drain()
    after = await counts()
    assert {o: after[o] - before[o] for o in outcomes} == {
        "created": 4, "settled": 1, "released": 1, "expired": 1}
    await reconciler.expire_holds()
    assert await read_metric(client, "quota_open_holds") >= 1  # the one still open
    page = (await client.get("/metrics")).text
    assert user not in page
    await release(client, still_open)
    await reconciler.drain()  # no hold left open in the shared database


async def test_a_plan_meters_overdraft_reads_back_only_when_set(
    client: httpx.AsyncClient
) -> None:
    code = await overdraft_plan(client, limit=100, overdraft=20)
    meters = (await client.get(f"/internal/billing/plans/{code}")).json()["meters"]
    assert meters == {"chat": {"limit": 100, "period": "day", "overdraft": 20}}
    plain = unique_plan()
    await put_plan(client, plain, {"chat": {"limit": 5, "period": "day"}})
    assert (await client.get(f"/internal/billing/plans/{plain}")).json()["meters"] == {
        "chat": {"limit": 5, "period": "day"}}
    bad = await client.put(f"/internal/billing/plans/{unique_plan()}", json={
        "meters": {"chat": {"limit": 5, "period": "day", "overdraft": -1}}})
    assert bad.status_code == 422
