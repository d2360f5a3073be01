"""Debits batched into one debit_many call: each item as if it ran alone, in order.

Debits issued in the same event-loop tick go out as one EVALSHA of debit_many.lua
(lua/connection.py). These tests issue them with asyncio.gather on one engine (one
connection, already open, so every call is queued in the same tick) against the real Redis
and record the size of every batch the connection packs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.errors import DependencyUnavailable
from core.settings import Settings
from lua import resp
from lua.replies import DebitReply, Status
from ops.devservers import EmbeddedRedis
from quota.engine import Engine
from tests.support import app_client, apply_plan, new_ref, new_user, put_plan, unique_plan

U = 1_000_000  # one unit in micro-units (the engine's amounts)


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of items of every batch script call packed, in order."""
    sizes: list[int] = []
    pack = resp.Batch.pack

    def recording_pack(self: resp.Batch) -> bytes:
        sizes.append(len(self.futures))
        return pack(self)

    monkeypatch.setattr(resp.Batch, "pack", recording_pack)
    yield sizes


async def _warm(engine: Engine, *users: str) -> None:
    """Open the connection and load the users (one debit each, outside the batch)."""
    await engine.redis.execute("PING")
    for user in users:
        assert (await engine.debit(user, "chat", U, new_ref())).status is Status.OK


async def test_500_concurrent_debits_of_1_against_100_accept_exactly_100(
    engine: Engine, client: httpx.AsyncClient, batch_sizes: list[int]
) -> None:
    """Through the batch path (batches of at most 32): exactly 100 OK, balances 99 .. 0."""
    user = new_user()
    plan = unique_plan()
    await put_plan(client, plan, {"units": {"limit": 100, "period": "month"}})
    await apply_plan(client, user, plan)
    await engine.debit(user, "units", U, new_ref())  # loads the user: 99 left
    batch_sizes.clear()
    replies = await asyncio.gather(*(engine.debit(user, "units", U, new_ref())
                                     for _ in range(500)))
    statuses = [r.status for r in replies]
    assert statuses.count(Status.OK) == 99
    assert statuses.count(Status.INSUFFICIENT) == 401
    assert statuses[:99] == [Status.OK] * 99  # in call order, as if one after the other
    assert [r.remaining for r in replies[:99]] == [n * U for n in range(98, -1, -1)]
    assert sum(batch_sizes) == 500 and max(batch_sizes) == resp.BATCH_MAX
    assert len(batch_sizes) < 500 / 8  # they really were batched
    check = await engine.check(user, ["units"])
    assert check.meters[0].remaining == 0 and check.meters[0].used == 100 * U


async def test_same_ref_twice_in_one_batch_behaves_as_in_sequence(
    engine: Engine, batch_sizes: list[int], raw_redis: aioredis.Redis
) -> None:
    """OK, then DUPLICATE with the first tx, then REF_REUSED (another amount): one debit."""
    user = new_user()
    await _warm(engine, user)
    batch_sizes.clear()
    ref = new_ref()
    first, second, third = await asyncio.gather(
        engine.debit(user, "chat", 2 * U, ref), engine.debit(user, "chat", 2 * U, ref),
        engine.debit(user, "chat", 3 * U, ref))
    assert batch_sizes == [3]
    assert first.status is Status.OK and first.remaining == (50 - 1 - 2) * U
    assert second.status is Status.DUPLICATE
    assert (second.tx_id, second.remaining) == (first.tx_id, first.remaining)
    assert third.status is Status.REF_REUSED
    check = await engine.check(user, ["chat"])
    assert check.meters[0].used == 3 * U  # 1 (warm-up) + 2, once
    ledger = engine.keys.ledger(engine.keys.shard(user))
    events = [e for _, e in await raw_redis.xrange(ledger) if f"\x1f{ref}\x1f" in e["e"]]
    assert len(events) == 1


async def test_not_loaded_item_in_the_middle_is_retried_alone(
    engine: Engine, batch_sizes: list[int]
) -> None:
    """A user Redis does not hold, between two loaded ones: loaded, retried, all OK."""
    loaded = new_user()  # the same shard for both, so one call under Redis Cluster too
    fresh = next(u for u in iter(new_user, None)
                 if engine.keys.shard(u) == engine.keys.shard(loaded))
    await _warm(engine, loaded)
    batch_sizes.clear()
    replies = await asyncio.gather(engine.debit(loaded, "chat", U, new_ref()),
                                   engine.debit(fresh, "chat", 5 * U, new_ref()),
                                   engine.debit(loaded, "chat", U, new_ref()))
    # the fresh user's item comes back alone after loading (the user, then maybe its
    # shard's catalog copy)
    assert batch_sizes[0] == 3 and set(batch_sizes[1:]) == {1}
    assert [r.status for r in replies] == [Status.OK] * 3
    assert [r.remaining for r in replies] == [48 * U, 45 * U, 47 * U]


@pytest.mark.single_redis  # a cluster call carries one slot: tests/integration/test_cluster.py
async def test_mixed_users_and_shards_in_one_batch(
    engine: Engine, batch_sizes: list[int]
) -> None:
    """40 users over many shards, two debits each, one tick: batches of <= 32, all exact."""
    users = [new_user() for _ in range(40)]
    await _warm(engine, *users)
    assert len({engine.keys.shard(u) for u in users}) > 8
    batch_sizes.clear()
    replies = await asyncio.gather(*(engine.debit(u, "chat", amount * U, new_ref())
                                     for amount in (2, 3) for u in users))
    assert batch_sizes == [32, 32, 16]
    assert all(r.status is Status.OK for r in replies)
    assert [r.remaining for r in replies] == [47 * U] * 40 + [44 * U] * 40
    for user in users:
        assert (await engine.check(user, ["chat"])).meters[0].used == 6 * U


@pytest.mark.single_redis  # a cluster call carries one slot
async def test_one_catalog_lookup_serves_every_shard_of_a_call(
    engine: Engine, batch_sizes: list[int], raw_redis: aioredis.Redis
) -> None:
    """Every shard holds a copy of the same catalog, so the rule read from one copy serves
    the call's debits in all shards; a shard whose copy is gone gets it back when one of
    its debits is the first to look the rule up."""
    first = new_user()
    other = next(u for u in iter(new_user, None)
                 if engine.keys.shard(u) != engine.keys.shard(first))
    await _warm(engine, first, other)
    other_catalog = engine.keys.plans(engine.keys.shard(other))
    assert await raw_redis.delete(other_catalog) == 1
    batch_sizes.clear()
    replies = await asyncio.gather(engine.debit(first, "chat", U, new_ref()),
                                   engine.debit(other, "chat", U, new_ref()))
    assert batch_sizes == [2] and [r.status for r in replies] == [Status.OK] * 2
    assert await raw_redis.exists(other_catalog) == 0
    alone = await engine.debit(other, "chat", U, new_ref())
    assert alone.status is Status.OK and alone.remaining == 47 * U
    assert batch_sizes[1:] == [1, 1]  # NOT_LOADED (catalog), copied back, run again
    assert await raw_redis.exists(other_catalog) == 1


async def test_script_error_of_one_item_fails_that_item_only(
    engine: Engine, batch_sizes: list[int], raw_redis: aioredis.Redis
) -> None:
    """A wrong key type under one item: that caller gets the error, the others are OK."""
    good = new_user()  # the same shard for both, so one call under Redis Cluster too
    bad = next(u for u in iter(new_user, None)
               if engine.keys.shard(u) == engine.keys.shard(good))
    await _warm(engine, good, bad)
    ref = new_ref()
    bucket = engine.clock.now_ms() // (engine.settings.idempotency_ttl_seconds * 1000)
    await raw_redis.delete(engine.keys.ref_bucket(bad, bucket))  # the warm-up's refs
    await raw_redis.rpush(engine.keys.ref_bucket(bad, bucket), "x")  # WRONGTYPE for HMGET
    batch_sizes.clear()
    results = await asyncio.gather(engine.debit(good, "chat", U, new_ref()),
                                   engine.debit(bad, "chat", U, ref),
                                   engine.debit(good, "chat", U, new_ref()),
                                   return_exceptions=True)
    assert batch_sizes == [1 + 1 + 1]
    assert isinstance(results[0], DebitReply) and results[0].status is Status.OK
    assert isinstance(results[2], DebitReply) and results[2].status is Status.OK
    assert isinstance(results[1], DependencyUnavailable) and "WRONGTYPE" in str(results[1])


async def test_emptied_script_cache_resends_the_batch_by_eval(
    settings: Settings, clock: FixedClock, private_redis_url: str, batch_sizes: list[int]
) -> None:
    """NOSCRIPT for a batch: the whole batch goes again as EVAL, each item answered once."""
    async with app_client(settings.with_overrides(redis_url=private_redis_url), clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        users = [new_user() for _ in range(5)]
        await _warm(engine, *users)
        admin = aioredis.Redis.from_url(private_redis_url)
        await admin.script_flush()
        await admin.aclose()
        batch_sizes.clear()
        replies = await asyncio.gather(*(engine.debit(u, "chat", U, new_ref()) for u in users))
        assert batch_sizes == [5, 5]  # EVALSHA, then EVAL of the same batch
        assert [(r.status, r.remaining) for r in replies] == [(Status.OK, 48 * U)] * 5


@pytest.fixture
async def private_redis_url(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis of this test's own (its script cache may be flushed)."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


async def test_lost_connection_fails_every_item_of_the_batch_with_503(
    settings: Settings, clock: FixedClock, batch_sizes: list[int]
) -> None:
    """A 'Redis' that hangs up on the first command: every debit of the batch answers 503."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        broken = settings.with_overrides(redis_url=f"redis://127.0.0.1:{port}/0",
                                         redis_wait_replicas=0)  # no INFO on connect
        async with app_client(broken, clock) as http:
            engine: Engine = http.engine  # type: ignore[attr-defined]
            engine.redis.on_connect = None  # no instance check: it would be refused first
            await engine.redis._pipe()  # connected; nothing sent yet
            body = {"action": "chat_tokens", "units": 1}
            responses = await asyncio.gather(*(
                http.post("/internal/billing/quota/debit",
                          json={**body, "user_id": new_user(), "ref": new_ref()})
                for _ in range(10)))
        assert len(batch_sizes) == 1 and batch_sizes[0] >= 2
        assert sum(batch_sizes) == 10
        assert [r.status_code for r in responses] == [503] * 10
        assert {r.json()["error"]["code"] for r in responses} == {"unavailable"}
    finally:
        server.close()
        await server.wait_closed()
