"""Missing state is not zero usage: Redis rebuilt from the PostgreSQL ledger."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core import metrics
from core.clock import FixedClock
from core.events import LedgerEvent, decode
from core.settings import Settings
from lua import instance
from lua.connection import PipelinedRedis, RedisUnavailable
from lua.resp import RedisReplyError
from persistence.db import PostgresUnavailable
from quota import loading
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import (
    DAY_MS,
    HOUR_MS,
    T0,
    apply_plan,
    balance_debit,
    debit,
    forget_ref,
    new_ref,
    new_user,
    put_plan,
    ref_bucket,
    ref_granularity_ms,
    unique_plan,
)


@pytest.fixture
async def reconciler(engine: Engine, settings: Settings, raw_redis: aioredis.Redis
                     ) -> AsyncIterator[Reconciler]:
    """A reconciler on the test's prefix (drained by the test when it needs it)."""
    yield Reconciler(engine, raw_redis, name="test-consumer")


async def _wipe_user(raw_redis: aioredis.Redis, settings: Settings, user: str) -> int:
    keys = [k async for k in raw_redis.scan_iter(match=f"{settings.key_prefix}:*:u:{user}*")]
    return int(await raw_redis.delete(*keys)) if keys else 0


async def _ledger_debits(engine: Engine, user: str) -> tuple[list[tuple[str, int]], int]:
    """The user's debits in the ledger as (tx id, ref round), by round, and the flushed
    usage of its chat meter, micro-units."""
    async with engine.db.connection() as conn:
        rows = await conn.fetch("SELECT tx_id::text, ref_round FROM ledger WHERE user_id = $1 "
                                "AND kind = 'debit' ORDER BY ref_round", user)
        used = await conn.fetchval("SELECT sum(used_micro) FROM usage_counters "
                                   "WHERE user_id = $1 AND meter = 'chat'", user)
    return [tuple(r) for r in rows], used


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


async def test_counters_expire_by_the_script_clock_not_the_wall_clock(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine, clock: FixedClock,
    raw_redis: aioredis.Redis, settings: Settings,
) -> None:
    """A counter lives until its period's end plus the grace, counted from the script's
    clock: with the clock pinned a year back, day and month usage still holds, whether the
    debit made the counter or load_user rebuilt it from PostgreSQL. (Absolute expiry times
    would be a year past on the wall clock, so Redis would drop the counters at once.)"""
    clock.set(T0 - 365 * DAY_MS)
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": 10, "period": "day"},
                                  "units": {"limit": 100, "period": "month"}})
    await apply_plan(client, user, plan)
    assert (await debit(client, user, 4)).status_code == 200
    assert (await balance_debit(client, user, 30)).status_code == 200
    windows = engine.calendar.windows(clock.now_ms())
    grace_ms = settings.counter_grace_seconds * 1000
    day = engine.keys.counters(user, "chat", windows)[0]
    month = engine.keys.counters(user, "units", windows)[1]

    async def assert_counters_live() -> None:
        for key, kind, used in ((day, "d", 4), (month, "m", 30)):
            assert int(await raw_redis.get(key)) == used * 1_000_000
            expected = windows.period_end_ms(kind) + grace_ms - clock.now_ms()
            assert expected - 60_000 < await raw_redis.pttl(key) <= expected

    await assert_counters_live()
    await reconciler.drain()
    assert await _wipe_user(raw_redis, settings, user) >= 3
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["chat"]["remaining"] == 6  # rebuilt by load_user
    await assert_counters_live()
    assert (await debit(client, user, 7)).status_code == 403


@pytest.mark.parametrize("page", [1, loading.RESTORE_PAGE], ids=["pages", "with-the-state"])
async def test_a_retry_after_redis_lost_the_user_answers_409_and_debits_nothing(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine, clock: FixedClock,
    raw_redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch,
    page: int,
) -> None:
    """Invariant 2 across a loss of Redis data: the idempotency keys of flushed debits are
    restored from the ledger when the user is loaded, with the TTL they had left, so a
    retry (20 at once here) answers 409 with the original tx_id and remaining; the same
    ref with another amount is still 422; nothing is debited twice, in Redis or the ledger.
    Pages of one ledger row walk several pages (``Loader.restore_refs``) before the state
    is written; a history within one page is put back by load_user.lua itself."""
    monkeypatch.setattr(loading, "RESTORE_PAGE", page)
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": 10, "period": "day"},
                                  "units": {"limit": 100, "period": "month"}})
    await apply_plan(client, user, plan)
    chat_ref, units_ref = new_ref(), new_ref()
    chat = (await debit(client, user, 3, ref=chat_ref)).json()
    units = (await balance_debit(client, user, 12.5, ref=units_ref, reason="pdf export")).json()
    clock.advance(HOUR_MS)
    await reconciler.drain()
    assert await _wipe_user(raw_redis, settings, user) >= 4  # state, 2 counters, refs
    assert await ref_bucket(raw_redis, engine.keys, user, chat_ref) is None

    restores: list[str] = []
    restore = engine.loader.restore_refs

    async def counted(user_id: str, **page: Any) -> int:
        restores.append(user_id)
        return await restore(user_id, **page)

    monkeypatch.setattr(engine.loader, "restore_refs", counted)
    loads, restored = metrics.USER_LOADS._value.get(), metrics.REFS_RESTORED._value.get()
    retries = await asyncio.gather(*(debit(client, user, 3, ref=chat_ref) for _ in range(20)))
    # 20 requests, one load (single flight); its two keys restored by pages or with it
    assert restores == ([user] if page == 1 else [])
    assert metrics.USER_LOADS._value.get() == loads + 1
    assert metrics.REFS_RESTORED._value.get() == restored + 2
    assert {r.status_code for r in retries} == {409}
    assert {(r.json()["tx_id"], r.json()["remaining"]) for r in retries} == {
        (chat["tx_id"], chat["remaining"])}
    assert chat["remaining"] == 7
    ttl_ms = settings.idempotency_ttl_seconds * 1000
    debited_at = clock.now_ms() - HOUR_MS  # back in the bucket of its debit's time
    bucket = debited_at // ttl_ms
    assert (await ref_bucket(raw_redis, engine.keys, user, chat_ref)
            == engine.keys.ref_bucket(user, bucket))
    # the bucket the restore made expires as a live one does: two windows and a margin on
    expected = (bucket + 2) * ttl_ms + 65_536 - clock.now_ms()
    pttl = await raw_redis.pttl(engine.keys.ref_bucket(user, bucket))
    assert expected - 60_000 < pttl <= expected
    again = await balance_debit(client, user, 12.5, ref=units_ref, reason="pdf export")
    assert again.status_code == 409
    assert (again.json()["tx_id"], again.json()["balance"]) == (units["tx_id"], units["balance"])
    reused = await balance_debit(client, user, 12.5, ref=units_ref, reason="another reason")
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "ref_reused"
    assert (await debit(client, user, 4, ref=chat_ref)).status_code == 422

    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert (check["meters"]["chat"]["remaining"], check["meters"]["units"]["remaining"]) == (
        7, 87.5)
    await reconciler.drain()
    async with engine.db.connection() as conn:
        rows = await conn.fetch("SELECT ref, remaining_micro FROM ledger "
                                "WHERE user_id = $1 AND kind = 'debit'", user)
    assert sorted((r["ref"], r["remaining_micro"]) for r in rows) == sorted(
        [(chat_ref, 7_000_000), (units_ref, 87_500_000)])


async def test_a_debit_held_by_the_reconciler_when_redis_lost_it_is_not_doubled(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine, clock: FixedClock,
    raw_redis: aioredis.Redis, settings: Settings,
) -> None:
    """Invariant 2 when Redis loses a debit that a reconciler has read but not committed:
    the retry of its ref finds it neither in Redis nor in the ledger and is debited again
    with a new tx id. The ledger keeps one debit per (user, ref): the second flush inserts
    nothing, counts nothing, and is reported as a ref conflict."""
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": 10, "period": "day"}})
    await apply_plan(client, user, plan)
    await reconciler.drain()
    ref = new_ref()
    first = (await debit(client, user, 3, ref=ref)).json()
    held = [e for e in await reconciler.consumer.read()  # read, not yet written
            if str(decode(e.shard, e.stream_id, e.fields).tx_id) == first["tx_id"]]
    assert len(held) == 1
    assert await _wipe_user(raw_redis, settings, user) >= 3  # Redis lost the user and ref

    retry = await debit(client, user, 3, ref=ref)
    assert retry.status_code == 200 and retry.json()["tx_id"] != first["tx_id"]
    conflicts = metrics.LEDGER_REF_CONFLICTS._value.get()
    await reconciler.drain()  # the retry's debit is flushed (and the held one, if claimed)
    await reconciler.flush(held)  # the held one commits
    assert reconciler.stats.ref_conflicts == 1
    assert metrics.LEDGER_REF_CONFLICTS._value.get() == conflicts + 1
    rows, used = await _ledger_debits(engine, user)
    assert len(rows) == 1 and rows[0][0] in {first["tx_id"], retry.json()["tx_id"]}
    assert used == 3_000_000  # one debit of 3, as Redis holds it
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["chat"]["remaining"] == 7


async def test_keys_are_restored_by_redis_time_when_this_process_clock_runs_ahead(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine, clock: FixedClock,
    raw_redis: aioredis.Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key's life left is judged on the clock that stamped the debit (the script's), not
    on this process's: ten minutes ahead, it would have found a key with five minutes left
    already expired and left it out, and a retry would have been debited again (which the
    ledger, judging by the debits' times, then refuses as a double: usage lost)."""
    user, ref = new_user(), new_ref()
    first = (await debit(client, user, 1, ref=ref)).json()
    await reconciler.drain()
    clock.advance(settings.idempotency_ttl_seconds * 1000 - 5 * 60_000)
    await _wipe_user(raw_redis, settings, user)
    scripts_now = clock.now_ms
    monkeypatch.setattr(clock, "now_ms", lambda: scripts_now() + 10 * 60_000)
    retry = await debit(client, user, 1, ref=ref)
    assert retry.status_code == 409 and retry.json()["tx_id"] == first["tx_id"]
    clock.advance(4 * 60_000)  # a minute of its TTL left, on the script's clock
    assert (await debit(client, user, 1, ref=ref)).status_code == 409
    clock.advance(60_000 + ref_granularity_ms(settings))  # past it: new again
    assert (await debit(client, user, 1, ref=ref)).status_code == 200


async def test_a_ref_reused_past_its_ttl_reaches_the_ledger_as_a_new_debit(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine, clock: FixedClock,
    raw_redis: aioredis.Redis, settings: Settings,
) -> None:
    """Redis forgets a ref IDEMPOTENCY_TTL_SECONDS after its debit and debits a reuse as
    new (200, another tx id): the ledger keeps both, the reuse as the ref's round 1, so
    the usage a rebuild brings back is the usage Redis answered with."""
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": 10, "period": "none"}})
    await apply_plan(client, user, plan)
    ref = new_ref()
    first = (await debit(client, user, 3, ref=ref)).json()
    await reconciler.drain()
    clock.advance(settings.idempotency_ttl_seconds * 1000 + ref_granularity_ms(settings))
    again = await debit(client, user, 3, ref=ref)
    assert again.status_code == 200 and again.json()["tx_id"] != first["tx_id"]
    assert again.json()["remaining"] == 4
    reuses = metrics.LEDGER_REF_REUSES._value.get()
    await reconciler.drain()
    assert (reconciler.stats.ref_conflicts, reconciler.stats.ref_reuses) == (0, 1)
    assert metrics.LEDGER_REF_REUSES._value.get() == reuses + 1
    rows, used = await _ledger_debits(engine, user)
    assert rows == [(first["tx_id"], 0), (again.json()["tx_id"], 1)]
    assert used == 6_000_000
    await _wipe_user(raw_redis, settings, user)
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["chat"]["remaining"] == 4
    # Within the TTL of the reuse, the ref is a duplicate again (restored from the ledger).
    assert (await debit(client, user, 3, ref=ref)).status_code == 409


async def test_the_writer_settles_a_refused_debit_by_the_times_of_its_refs_debits(
    reconciler: Reconciler, engine: Engine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer's side of a refused debit, against the ledger: past the TTL of every
    debit of its ref it is a reuse (the next round); within it a conflict; written by
    another reconciler meanwhile (both held the entry) a duplicate, not a conflict; and
    when the next round keeps being taken, the batch is left for a retry, never dropped."""
    writer = reconciler.writer
    user, ref, ttl = new_user(), new_ref(), timedelta(seconds=settings.idempotency_ttl_seconds)
    start = datetime.fromtimestamp(T0 / 1000, UTC)

    def event(at: datetime) -> LedgerEvent:
        return LedgerEvent(
            tx_id=uuid.uuid4(), kind="debit", user_id=user, meter="chat", amount=-1_000_000,
            from_allowance=1_000_000, from_credits=0, period_id="n", ref=ref, reason="",
            caller="test", action="chat_tokens", plan_code="free", occurred_at=at,
            shard=engine.keys.shard(user), stream_id=None, remaining=0)

    first = event(start)
    assert await writer._batch([first], []) == 1
    reuse = event(start + ttl + timedelta(milliseconds=1))
    assert await writer._write_reuse(reuse) == "reuse"
    assert await writer._write_reuse(reuse) == "written"  # another one wrote it meanwhile
    assert await writer._write_reuse(event(start + timedelta(seconds=5))) == "conflict"
    assert await writer._write_reuse(event(start + 2 * ttl)) == "conflict"  # near the reuse
    async with engine.db.connection() as conn:
        rounds = await conn.fetch("SELECT tx_id, ref_round FROM ledger WHERE user_id = $1 "
                                  "ORDER BY ref_round", user)
    assert [tuple(r) for r in rounds] == [(first.tx_id, 0), (reuse.tx_id, 1)]

    async def round_taken(events: list[LedgerEvent], bad: list[Any]) -> int:
        return 0

    monkeypatch.setattr(writer, "_batch", round_taken)
    with pytest.raises(PostgresUnavailable, match="will be retried"):
        await writer._write_reuse(event(start + 3 * ttl))


async def test_a_redis_back_with_older_data_is_rebuilt_from_postgres(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine,
    raw_redis: aioredis.Redis, settings: Settings,
) -> None:
    """Invariants 2 and 4 when Redis comes back older than it was (restarted from an AOF
    that lacks its last second, or a lagging replica promoted): its users are still marked
    loaded, so without a check nothing would be rebuilt. A new connection sees another
    run_id than the one recorded, answers 503, and the rebuild waits for the reconciler to
    flush what the streams still hold before it drops user and catalog state; then the
    lost debit's retry is a 409 with its tx id, and usage is PostgreSQL's."""
    user, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"chat": {"limit": 10, "period": "day"}})
    await apply_plan(client, user, plan)
    lost_ref = new_ref()
    assert (await debit(client, user, 3)).status_code == 200
    lost = (await debit(client, user, 2, ref=lost_ref)).json()
    await reconciler.drain()
    kept = (await debit(client, user, 1)).json()  # still in the stream only
    run_id = (await raw_redis.info("server"))["run_id"]
    guard = engine.guard
    assert await raw_redis.get(guard.instance_key) == run_id  # recorded on first connect

    # The Redis that comes back lacks the 2-unit debit, and its data was another process's.
    counter = engine.keys.counters(user, "chat", engine.rt.windows())[0]
    await raw_redis.decrby(counter, 2_000_000)
    assert await forget_ref(raw_redis, engine.keys, user, lost_ref) == 1
    await raw_redis.set(guard.instance_key, "f" * 40)
    await engine.redis.close()  # a restart drops every connection

    refused = await debit(client, user, 2, ref=lost_ref)
    assert refused.status_code == 503
    assert "older data" in refused.json()["error"]["message"]
    assert guard.rebuild is not None
    await asyncio.sleep(3 * instance.POLL_SECONDS)
    assert not guard.rebuild.done()  # the stream still holds the 1-unit debit
    assert await raw_redis.exists(engine.keys.user(user)) == 1
    assert (await debit(client, user, 1)).status_code == 503
    await reconciler.drain()
    await asyncio.wait_for(guard.rebuild, 10)
    assert await raw_redis.get(guard.instance_key) == run_id
    assert await raw_redis.exists(engine.keys.user(user)) == 0  # reloads on first use

    retry = await debit(client, user, 2, ref=lost_ref)
    assert retry.status_code == 409, retry.text
    assert (retry.json()["tx_id"], retry.json()["remaining"]) == (lost["tx_id"], 5)
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["chat"]["remaining"] == 4  # 10 - 3 - 2 - 1, none of it free
    assert kept["remaining"] == 4


async def test_an_empty_redis_is_recorded_and_served_at_once(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis,
) -> None:
    """No instance key (a new or emptied Redis): nothing to rebuild, the first connection
    records the run_id and serves; the same run_id serves again after a reconnect."""
    run_id = (await raw_redis.info("server"))["run_id"]
    user = new_user()
    assert (await debit(client, user, 1)).status_code == 200
    assert await raw_redis.get(engine.guard.instance_key) == run_id
    await raw_redis.delete(engine.guard.instance_key)  # FLUSHALL-like
    await engine.redis.close()
    assert (await debit(client, user, 1)).status_code == 200
    await engine.redis.close()
    assert (await debit(client, user, 1)).status_code == 200
    assert engine.guard.rebuild is None


async def test_of_two_processes_finding_older_data_one_rebuilds(
    engine: Engine, raw_redis: aioredis.Redis, settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two processes' guards see another run_id at once: both refuse, one takes the lock and
    drops the state, the other's rebuild finds the lock taken and drops nothing; the run_id
    is recorded once and both serve again."""
    run_id = (await raw_redis.info("server"))["run_id"]
    guards = [instance.InstanceGuard(settings.redis_url, engine.keys) for _ in range(2)]
    await raw_redis.set(guards[0].instance_key, "e" * 40)
    user_hash = engine.keys.user(new_user())
    await raw_redis.hset(user_hash, mapping={"loaded": "1", "cr:chat": "5"})
    drops: list[int] = []
    for guard in guards:
        original = guard._drop_state

        async def counted(*args: Any, original: Any = original) -> int:
            drops.append(1)
            return int(await original(*args))

        monkeypatch.setattr(guard, "_drop_state", counted)

    assert settings.redis_url
    clients = [PipelinedRedis(settings.redis_url, timeout_seconds=5, connect_timeout_seconds=5)
               for _ in guards]
    try:
        for client, guard in zip(clients, guards, strict=True):
            client.on_connect = guard.check
            with pytest.raises(RedisUnavailable, match="older data"):
                await client.execute("PING")
        await asyncio.gather(*(g.rebuild for g in guards if g.rebuild is not None))
        assert drops == [1]
        assert await raw_redis.exists(user_hash) == 0
        assert await raw_redis.get(guards[0].instance_key) == run_id
        assert await raw_redis.exists(guards[0].lock_key) == 0  # released
        for client in clients:
            assert await client.execute("PING") == "PONG"  # serves
    finally:
        for client in clients:
            await client.close()


async def test_a_redis_that_hides_its_run_id_is_served_with_a_warning(
    engine: Engine, caplog: pytest.LogCaptureFixture,
) -> None:
    """An ACL user without INFO (or a managed Redis without run_id): the checks cannot be
    made; connections serve, and the log says once for each that it is off."""
    guard = instance.InstanceGuard(None, engine.keys)

    async def no_info(*args: Any) -> Any:
        if args[0] == "INFO":
            raise RedisReplyError("NOPERM this user has no permissions to run the 'info' "
                                  "command")
        raise AssertionError(f"unexpected {args}")

    with caplog.at_level(logging.WARNING, logger="quota_gateway.instance"):
        await guard.check(no_info)
        await guard.check(no_info)
    for field in ("run_id", "maxmemory_policy"):  # neither check can be made
        warnings = [r.getMessage() for r in caplog.records if field in r.getMessage()]
        assert len(warnings) == 1 and "NOPERM" in warnings[0]
    assert guard.rebuild is None


async def test_refs_past_their_ttl_are_not_restored(
    client: httpx.AsyncClient, reconciler: Reconciler, engine: Engine, clock: FixedClock,
    raw_redis: aioredis.Redis, settings: Settings,
) -> None:
    """Only refs within IDEMPOTENCY_TTL_SECONDS come back: after it, a ref is new again,
    as it would be had Redis lost nothing."""
    user = new_user()
    old_ref, recent_ref = new_ref(), new_ref()
    assert (await debit(client, user, 1, ref=old_ref)).status_code == 200
    clock.advance(settings.idempotency_ttl_seconds * 1000 - HOUR_MS)
    assert (await debit(client, user, 1, ref=recent_ref)).status_code == 200
    await reconciler.drain()
    clock.advance(2 * HOUR_MS)  # old_ref is past its TTL, recent_ref is not
    await _wipe_user(raw_redis, settings, user)
    assert (await debit(client, user, 1, ref=recent_ref)).status_code == 409
    assert await ref_bucket(raw_redis, engine.keys, user, old_ref) is None
    assert (await debit(client, user, 1, ref=old_ref)).status_code == 200
