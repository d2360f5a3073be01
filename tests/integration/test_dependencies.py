"""Dependencies down: 503 with the dependency named, never 500; a lost script cache heals."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from hotpath.results import ReadyOut
from lua.connection import RedisUnavailable
from ops.devservers import EmbeddedRedis, free_port
from persistence.db import PostgresUnavailable
from persistence.migrate import latest, migrate
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import app_client, debit, new_user, read_metric, unique_plan


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, which it may kill or flush."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_redis_down_answers_503_and_ready_says_redis(settings: Settings,
                                                           clock: FixedClock) -> None:
    """With nothing listening on the Redis port, debits and /ready answer 503."""
    dead = settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    errors = "quota_dependency_errors_total"
    async with app_client(dead, clock) as http:
        before = await read_metric(http, errors, dependency="redis")
        response = await debit(http, new_user(), 1)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert response.headers["retry-after"] == "1"
        ready = await http.get("/ready")
        assert ready.status_code == 503
        assert msgspec.convert(ready.json(), ReadyOut).status == "unavailable"  # as the spec says
        assert ready.json()["checks"]["postgres"] == "ok"
        assert "Redis" in ready.json()["checks"]["redis"]
        assert await read_metric(http, errors, dependency="redis") == before + 1  # the debit


async def test_postgres_down_blocks_loading_new_users_with_503(settings: Settings,
                                                              clock: FixedClock) -> None:
    """A user not in Redis cannot be loaded without PostgreSQL: 503, nothing assumed zero."""
    dead = settings.with_overrides(db_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                                   db_timeout_seconds=2.0)
    errors = "quota_dependency_errors_total"
    async with app_client(dead, clock) as http:
        before = await read_metric(http, errors, dependency="postgres")
        response = await debit(http, new_user(), 1)
        assert response.status_code == 503
        assert "PostgreSQL" in response.json()["error"]["message"]
        ready = (await http.get("/ready")).json()
        assert ready["checks"]["redis"] == "ok" and ready["checks"]["postgres"] != "ok"
        assert await read_metric(http, errors, dependency="postgres") == before + 1


#: A plan PUT made from "no such plan yet" (version 0).
NEW_PLAN = {"meters": {"chat": {"limit": 3, "period": "day"}}, "duration_days": 30,
            "price": "10.00", "currency": "RUB", "version": 0}


async def test_a_plan_put_with_redis_down_is_503_and_commits_nothing(
    settings: Settings, clock: FixedClock
) -> None:
    """Redis is asked before the plan is committed: down, the PUT is a 503 and PostgreSQL
    holds no trace of it (a retry is the same request, not a version conflict)."""
    dead = settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    code = unique_plan()
    async with app_client(dead, clock) as http:
        response = await http.put(f"/internal/billing/plans/{code}", json=NEW_PLAN)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert (await http.get(f"/internal/billing/plans/{code}")).status_code == 404


async def test_a_plan_committed_before_redis_fails_answers_200(
    settings: Settings, clock: FixedClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis lost between the commit and the copy to the shards: the change is durable,
    so the PUT answers 200 with it (the reconciler's catalog resync finishes the copy:
    test_a_plan_change_that_missed_a_shard_reaches_it_with_the_reconciler); a 503 would
    have the caller's retry of its version refused as a conflict with its own change."""
    code = unique_plan()
    async with app_client(settings, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]

        async def redis_gone(*args: object) -> int:
            raise RedisUnavailable("connection to Redis lost: test")

        engine.loader.sync_catalog = redis_gone  # type: ignore[method-assign,assignment]
        with caplog.at_level(logging.WARNING, logger="quota_gateway.plans"):
            response = await http.put(f"/internal/billing/plans/{code}", json=NEW_PLAN)
        assert response.status_code == 200, response.text
        stored = (await http.get(f"/internal/billing/plans/{code}")).json()
        assert stored["version"] == response.json()["version"]
        assert stored["meters"]["chat"]["limit"] == 3
        assert any("catalog resync" in r.getMessage() for r in caplog.records)


async def test_emptied_script_cache_falls_back_to_eval(
    settings: Settings, clock: FixedClock, private_redis: EmbeddedRedis
) -> None:
    """After SCRIPT FLUSH (a restart or failover), calls succeed through the NOSCRIPT path."""
    async with app_client(settings.with_overrides(redis_url=private_redis.url), clock) as http:
        user = new_user()
        assert (await debit(http, user, 1)).status_code == 200
        admin = aioredis.Redis.from_url(private_redis.url)
        await admin.script_flush()
        await admin.aclose()
        again = await debit(http, user, 1)
        assert again.status_code == 200 and again.json()["remaining"] == 48
        assert (await http.get("/ready")).status_code == 200


async def test_a_redis_that_may_evict_keys_is_refused_until_noeviction(
    settings: Settings, clock: FixedClock, private_redis: EmbeddedRedis
) -> None:
    """An evicted period counter would read as a new period (a free reset): a Redis whose
    maxmemory-policy is not noeviction serves nothing (503, /ready says why), until it is."""
    admin = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        await admin.config_set("maxmemory-policy", "volatile-lru")
        async with app_client(settings.with_overrides(redis_url=private_redis.url),
                              clock) as http:
            user = new_user()
            refused = await debit(http, user, 1)
            assert refused.status_code == 503
            assert "maxmemory-policy volatile-lru" in refused.json()["error"]["message"]
            ready = await http.get("/ready")
            assert ready.status_code == 503
            assert "noeviction" in ready.json()["checks"]["redis"]
            assert await admin.dbsize() == 0  # nothing was written
            await admin.config_set("maxmemory-policy", "noeviction")
            served = await debit(http, user, 1)
            assert served.status_code == 200, served.text
            assert (await http.get("/ready")).status_code == 200
    finally:
        await admin.aclose()


async def test_redis_restart_mid_service_reconnects(
    settings: Settings, clock: FixedClock, private_redis: EmbeddedRedis
) -> None:
    """Invariant 4. A user debits 7 of the free plan's 50 a day and the reconciler flushes
    them to PostgreSQL. Redis (no persistence) is killed: debits answer 503 while it is
    gone. It comes back empty on the same port: the service reconnects, and the user,
    rebuilt from PostgreSQL, has exactly the flushed 7 used (43 left, not a fresh 50); the
    next debit counts from there, and the reconciler, its group recreated, flushes it."""
    local = settings.with_overrides(redis_url=private_redis.url)
    admin = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        async with app_client(local, clock) as http:
            engine: Engine = http.engine  # type: ignore[attr-defined]
            reconciler = Reconciler(engine, admin, name="restart-test")
            user = new_user()
            first = await debit(http, user, 7)
            assert first.status_code == 200 and first.json()["remaining"] == 43, first.text
            await reconciler.drain()
            assert await _flushed_chat_micro(engine, user) == 7_000_000

            private_redis.kill()
            gone = await debit(http, user, 1)
            assert gone.status_code == 503, gone.text
            private_redis.start()  # same port, no data: everything in Redis is lost
            await admin.connection_pool.disconnect()
            assert await admin.dbsize() == 0

            loads = await read_metric(http, "quota_user_loads_total")
            check = await http.get(f"/internal/billing/quota/check/{user}")
            assert check.status_code == 200, check.text
            assert check.json()["remain_chat"] == 43  # the flushed usage, rebuilt
            assert await read_metric(http, "quota_user_loads_total") == loads + 1
            back = await debit(http, user, 1)
            assert back.status_code == 200 and back.json()["remaining"] == 42, back.text
            day_key, _ = engine.keys.counters(user, "chat",
                                              engine.calendar.windows(clock.now_ms()))
            assert await admin.get(day_key) == "8000000"
            assert (await http.get("/ready")).status_code == 200
            await reconciler.drain()
            assert await _flushed_chat_micro(engine, user) == 8_000_000
    finally:
        await admin.aclose()


async def _flushed_chat_micro(engine: Engine, user: str) -> int | None:
    """The user's chat usage flushed to PostgreSQL (all periods), micro-units."""
    async with engine.db.connection() as conn:
        used = await conn.fetchval("SELECT sum(used_micro) FROM usage_counters "
                                   "WHERE user_id = $1 AND meter = 'chat'", user)
    return None if used is None else int(used)


async def test_redis_restarted_from_an_older_snapshot_is_rebuilt_from_postgres(
    settings: Settings, clock: FixedClock, private_redis: EmbeddedRedis
) -> None:
    """The real thing: Redis saves a snapshot, accepts one more debit (flushed to
    PostgreSQL), is killed and starts again from the snapshot, i.e. older than it was and
    with its users still marked loaded. The service answers 503 until it has rebuilt them
    from PostgreSQL; then the lost debit's retry is a 409 with its tx id, usage is whole."""
    local = settings.with_overrides(redis_url=private_redis.url)
    admin = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        async with app_client(local, clock) as http:
            engine: Engine = http.engine  # type: ignore[attr-defined]
            reconciler = Reconciler(engine, admin, name="snapshot-test")
            user, ref = new_user(), "the-last-second"
            assert (await debit(http, user, 1)).status_code == 200
            await reconciler.drain()
            await admin.save()  # the file Redis will come back from
            lost = (await debit(http, user, 2, ref=ref)).json()
            await reconciler.drain()  # in PostgreSQL, not in the snapshot
            private_redis.kill()
            private_redis.start()
            await admin.connection_pool.disconnect()
            assert await admin.exists(engine.keys.user(user)) == 1  # loaded, and stale
            refused = await debit(http, user, 2, ref=ref)
            assert refused.status_code == 503
            assert engine.guard.rebuild is not None
            await asyncio.wait_for(engine.guard.rebuild, 10)
            retry = await debit(http, user, 2, ref=ref)
            assert retry.status_code == 409, retry.text
            assert (retry.json()["tx_id"], retry.json()["remaining"]) == (lost["tx_id"], 47)
            assert (await debit(http, user, 1)).json()["remaining"] == 46
            assert (await http.get("/ready")).status_code == 200
    finally:
        await admin.aclose()


async def test_a_schema_behind_the_build_is_not_ready_and_holds_the_flush(
    settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis, own_db_dsn: str,
) -> None:
    """A build deployed before `quota-gateway migrate` ran: /ready answers 503 naming the
    migration to run, and the reconciler flushes nothing (its events wait in the stream, none
    set aside as poison) until the schema is there. The newest migration's row is deleted
    from a database of the test's own: the session's must never look unmigrated to the
    tests running beside this one."""
    async with app_client(settings.with_overrides(db_dsn=own_db_dsn), clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        assert (await debit(http, new_user(), 1)).status_code == 200
        async with engine.db.connection() as conn:
            row = await conn.fetchrow("DELETE FROM schema_migrations WHERE version = $1 "
                                      "RETURNING version, name, checksum", latest())
        assert row is not None
        ready = await http.get("/ready")
        assert ready.status_code == 503
        message = ready.json()["checks"]["postgres"]
        assert f"needs {latest()}" in message and "quota-gateway migrate" in message
        reconciler = Reconciler(engine, raw_redis, name="schema-test")
        with pytest.raises(PostgresUnavailable, match="quota-gateway migrate"):
            await reconciler.drain()
        assert reconciler.stats.inserted == 0
        async with engine.db.connection() as conn:
            await conn.execute("INSERT INTO schema_migrations (version, name, checksum) "
                               "VALUES ($1, $2, $3)", *row)
        assert (await http.get("/ready")).status_code == 200
        await reconciler.drain()
        assert reconciler.stats.inserted == 1 and reconciler.stats.poisoned == 0


async def test_migration_0005_refuses_a_ledger_with_a_ref_debited_twice(
    blank_db_dsn: str,
) -> None:
    """The unique (user_id, ref) index of debits cannot be built over a ledger that already
    holds a ref debited twice: the migration stops, says how many (exactly the one pair put
    there) and how to find them, and changes nothing (its statements are one transaction).
    The schema is built up to 0004 in a database of the test's own."""
    migration = (Path(__file__).parents[2] / "persistence" / "sql" / "migrations"
                 / "0005_debit_ref_unique.sql").read_text()
    user = new_user()
    conn = await asyncpg.connect(blank_db_dsn)
    try:
        await migrate(conn, until=4)  # the ledger as it was before 0005
        for tx in (uuid.uuid4(), uuid.uuid4()):
            await conn.execute(
                "INSERT INTO ledger (tx_id, kind, user_id, meter, amount_micro, "
                "from_allowance_micro, ref, "
                "occurred_at) VALUES ($1, 'debit', $2, 'chat', -1, 1, 'r-1', now())",
                tx, user)
        indexes = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'ledger' " \
                  "ORDER BY indexname"
        before = [tuple(r) for r in await conn.fetch(indexes)]
        with pytest.raises(asyncpg.RaiseError,
                           match=r"the ledger holds 1 \(user_id, ref\) pairs debited"):
            await conn.execute(migration)
        assert [tuple(r) for r in await conn.fetch(indexes)] == before
        assert await conn.fetchval("SELECT count(*) FROM ledger") == 2
    finally:
        await conn.close()
