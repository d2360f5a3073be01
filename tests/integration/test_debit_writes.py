"""What a debit writes in Redis, and what a refused one leaves: counters, credits, TTLs.

debit_many.lua adds the amount to the period counter first and gives back what the debit
does not take from the allowance (one call instead of a read and a write), takes the
idempotency key only once the debit fits (SET NX, giving the counter change back when the
ref is already taken), and pushes the user hash's TTL back only when less than half of it
is left. These tests pin all three down against the real Redis: a refused debit and a
retried one leave every counter as it was (a counter either created is gone, none is left
without a TTL), a split between allowance and credits counts only the allowance part, and
a retry answers what its first attempt answered whatever the meter holds now.
"""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from lua.replies import Status
from quota.engine import Engine
from tests.support import (
    CREDIT,
    DAY_MS,
    apply_plan,
    debit,
    make_engine,
    new_ref,
    new_user,
    put_plan,
    ref_bucket,
    unique_plan,
)

U = 1_000_000  # one unit in micro-units


def _month_counter(engine: Engine, clock: FixedClock, user: str) -> str:
    windows = engine.calendar.windows(clock.now_ms())
    return engine.keys.counters(user, "chat", windows)[1]


async def _user_with_plan(client: httpx.AsyncClient, limit: int, credits: int = 0) -> str:
    """A user on a fresh plan of ``limit`` chat units a month, with ``credits`` bought."""
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": limit, "period": "month"}})
    if credits:
        bought = await client.post(CREDIT, json={
            "order_id": f"order-{new_ref()}", "user_id": user, "plan_code": plan,
            "units_chat": credits})
        assert bought.status_code == 200, bought.text
    else:
        await apply_plan(client, user, plan)
    return user


async def test_refused_debit_leaves_the_counter_as_it_was(
    client: httpx.AsyncClient, engine: Engine, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    user = await _user_with_plan(client, 10)
    counter = _month_counter(engine, clock, user)
    assert (await debit(client, user, 11)).status_code == 403
    assert await raw_redis.exists(counter) == 0  # the counter the refused debit made is gone
    assert (await debit(client, user, 4)).status_code == 200
    assert int(await raw_redis.get(counter)) == 4 * U
    assert (await debit(client, user, 7)).status_code == 403
    assert int(await raw_redis.get(counter)) == 4 * U
    assert await raw_redis.pttl(counter) > 0
    remaining = (await debit(client, user, 6)).json()["remaining"]
    assert remaining == 0 and int(await raw_redis.get(counter)) == 10 * U


async def test_split_between_allowance_and_credits_counts_only_the_allowance_part(
    client: httpx.AsyncClient, engine: Engine, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    user = await _user_with_plan(client, 10, credits=5)
    counter = _month_counter(engine, clock, user)
    user_key = engine.keys.user(user)
    first = (await debit(client, user, 8)).json()
    assert (first["from_allowance"], first["from_credits"], first["remaining"]) == (8, 0, 7)
    split = (await debit(client, user, 4)).json()
    assert (split["from_allowance"], split["from_credits"], split["remaining"]) == (2, 2, 3)
    assert int(await raw_redis.get(counter)) == 10 * U
    assert int(await raw_redis.hget(user_key, "cr:chat")) == 3 * U
    credits_only = (await debit(client, user, 3)).json()
    assert (credits_only["from_allowance"], credits_only["from_credits"]) == (0, 3)
    assert int(await raw_redis.get(counter)) == 10 * U
    assert int(await raw_redis.hget(user_key, "cr:chat")) == 0
    assert (await debit(client, user, 1)).status_code == 403
    assert int(await raw_redis.get(counter)) == 10 * U and await raw_redis.pttl(counter) > 0


async def test_credits_only_meter_creates_no_counter(
    client: httpx.AsyncClient, engine: Engine, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """A plan with no allowance for the meter: debits come from credits, no counter made."""
    user = await _user_with_plan(client, 0, credits=5)
    counter = _month_counter(engine, clock, user)
    taken = (await debit(client, user, 2)).json()
    assert (taken["from_allowance"], taken["from_credits"], taken["remaining"]) == (0, 2, 3)
    assert (await debit(client, user, 4)).status_code == 403
    assert await raw_redis.exists(counter) == 0


async def test_user_ttl_is_pushed_back_once_half_of_it_is_gone(
    client: httpx.AsyncClient, engine: Engine, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """Not on every debit: 'xt' remembers the expiry set, and only past half is it renewed."""
    user = await _user_with_plan(client, 1000)
    user_key = engine.keys.user(user)
    ttl_ms = engine.settings.user_state_ttl_seconds * 1000
    assert (await engine.debit(user, "chat", U, new_ref())).status is Status.OK
    assert int(await raw_redis.hget(user_key, "xt")) == clock.now_ms() + ttl_ms
    await raw_redis.pexpire(user_key, 600_000)  # stands in for the time gone by
    clock.advance(ttl_ms // 2 - 60_000)  # just under half: left alone
    assert (await engine.debit(user, "chat", U, new_ref())).status is Status.OK
    assert 0 < await raw_redis.pttl(user_key) <= 600_000
    clock.advance(120_000)  # past half: renewed to the full TTL
    assert (await engine.debit(user, "chat", U, new_ref())).status is Status.OK
    assert await raw_redis.pttl(user_key) > ttl_ms - 60_000
    assert int(await raw_redis.hget(user_key, "xt")) == clock.now_ms() + ttl_ms


async def test_a_retry_gives_its_counter_change_back_and_answers_the_first_outcome(
    client: httpx.AsyncClient, engine: Engine, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """A retry that would fit, one the meter can no longer pay and one the next day: each
    answers 409 with the first tx and balance, and no counter moves or is left behind."""
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": 10, "period": "day"}})
    await apply_plan(client, user, plan)
    day_counter = engine.keys.counters(user, "chat", engine.calendar.windows(clock.now_ms()))[0]
    ref = new_ref()
    first = (await debit(client, user, 4, ref)).json()
    assert first["remaining"] == 6 and int(await raw_redis.get(day_counter)) == 4 * U

    again = await debit(client, user, 4, ref)  # it would fit: the INCRBY is given back
    assert again.status_code == 409
    assert (again.json()["tx_id"], again.json()["remaining"]) == (first["tx_id"], 6)
    assert int(await raw_redis.get(day_counter)) == 4 * U

    assert (await debit(client, user, 6)).status_code == 200  # the day is used up
    exhausted = await debit(client, user, 4, ref)  # 409, not 403: the debit stands
    assert exhausted.status_code == 409 and exhausted.json()["tx_id"] == first["tx_id"]
    assert int(await raw_redis.get(day_counter)) == 10 * U

    clock.advance(DAY_MS)
    next_day = engine.keys.counters(user, "chat", engine.calendar.windows(clock.now_ms()))[0]
    later = await debit(client, user, 4, ref)
    assert later.status_code == 409 and later.json()["tx_id"] == first["tx_id"]
    assert await raw_redis.exists(next_day) == 0  # the counter the retry made is gone
    assert (await debit(client, user, 4, ref + "-other")).json()["remaining"] == 6
    assert await raw_redis.pttl(next_day) > 0


async def test_a_retry_while_the_backlog_is_full_still_answers_409(
    settings: Settings, engine: Engine, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """Past the backlog limit new debits are 503 but a retry learns its outcome: 409."""
    user = new_user()
    ref = new_ref()
    first = await engine.debit(user, "chat", U, ref)
    assert first.status is Status.OK
    full = make_engine(settings.with_overrides(max_backlog_entries=1), clock)
    try:
        retry = await full.debit(user, "chat", U, ref)
        assert (retry.status, retry.tx_id, retry.remaining) == (
            Status.DUPLICATE, first.tx_id, first.remaining)
        assert (await full.debit(user, "chat", U, new_ref())).status is Status.BACKLOG
    finally:
        await full.close()
    check = await engine.check(user, ["chat"])
    assert check.meters[0].used == U


async def test_refs_live_as_long_as_idempotency_ttl_seconds_says(
    settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis
) -> None:
    """A ref is remembered IDEMPOTENCY_TTL_SECONDS (here an hour) on the script's clock,
    and at most its stamp's unit longer (55 ms here); past it, the ref is new again. Its
    bucket expires as a whole once none of its refs can be live."""
    hourly = make_engine(settings.with_overrides(idempotency_ttl_seconds=3600), clock)
    try:
        user, ref = new_user(), new_ref()
        first = await hourly.debit(user, "chat", U, ref)
        assert first.status is Status.OK
        bucket = await ref_bucket(raw_redis, hourly.keys, user, ref)
        assert bucket is not None
        b = clock.now_ms() // 3_600_000
        assert bucket == hourly.keys.ref_bucket(user, b)
        ttl = await raw_redis.pttl(bucket)  # the bucket ends an hour after its hour ends
        assert 65_000 < ttl - ((b + 2) * 3_600_000 - clock.now_ms()) <= 65_536
        clock.advance(3_600_000 - 1)
        again = await hourly.debit(user, "chat", U, ref)
        assert again.status is Status.DUPLICATE and again.tx_id == first.tx_id
        clock.advance(1 + 55)
        assert (await hourly.debit(user, "chat", U, ref)).status is Status.OK
    finally:
        await hourly.close()
