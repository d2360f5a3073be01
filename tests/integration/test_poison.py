"""Resource errors never turn valid events into poison, and poisoned events can be written
once their cause is fixed (issue #17, defect 5).

PostgreSQL's class-53 errors (disk full, out of memory, too many connections) say nothing
about the entry: the reconciler keeps the batch in the stream and retries it. An entry
set aside for a reason of its own is listed, shown and replayed by
``quota-gateway poison list|show|replay``, idempotent on tx_id."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from persistence.db import PostgresUnavailable
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import make_engine, new_ref, new_user

CLI = str(Path(sys.executable).with_name("quota-gateway"))

#: A trigger that makes every ledger insert fail with disk_full (SQLSTATE 53100) while
#: the flag table holds a row: a real class-53 error from PostgreSQL itself.
DISK_FULL = """
CREATE TABLE test_disk_full (on_ boolean);
CREATE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM test_disk_full) THEN
        RAISE EXCEPTION 'could not extend file: No space left on device'
            USING ERRCODE = 'disk_full';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_disk_full BEFORE INSERT ON ledger
    FOR EACH ROW EXECUTE FUNCTION test_disk_full();
INSERT INTO test_disk_full VALUES (true);
"""


@pytest.fixture
async def own(settings: Settings, clock: FixedClock, own_db_dsn: str
              ) -> AsyncIterator[tuple[Engine, Settings]]:
    """An engine on a database of this test's own (the poison table is counted whole)."""
    local = settings.with_overrides(db_dsn=own_db_dsn)
    engine = make_engine(local, clock)
    try:
        yield engine, local
    finally:
        await engine.close()


async def sql(dsn: str, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        if not args and ";" in statement:  # a script of several statements
            await conn.execute(statement)
            return []
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def test_a_disk_full_postgresql_keeps_the_batch_for_a_retry(
    own: tuple[Engine, Settings], raw_redis: aioredis.Redis
) -> None:
    """While every ledger insert fails with disk_full, the reconciler's steps fail as
    "PostgreSQL unavailable", nothing is poisoned and the entries stay in the streams; once
    space is back, every acknowledged debit reaches the ledger exactly once."""
    engine, settings = own
    assert settings.db_dsn is not None
    await sql(settings.db_dsn, DISK_FULL)
    user = new_user()
    tx_ids = []
    for _ in range(5):
        reply = await engine.debit(user, "chat", 1_000_000, new_ref())
        tx_ids.append(reply.tx_id)
    reconciler = Reconciler(engine, raw_redis, name="disk-full")
    for _ in range(3):
        with pytest.raises(PostgresUnavailable, match="transient"):
            await reconciler.step()
    assert (await sql(settings.db_dsn, "SELECT count(*) AS n FROM poison_events"))[0]["n"] == 0
    shard = engine.keys.shard(user)
    assert await raw_redis.xlen(engine.keys.ledger(shard)) == 5
    await sql(settings.db_dsn, "DELETE FROM test_disk_full")
    await reconciler.drain()
    rows = await sql(settings.db_dsn, "SELECT tx_id::text AS tx FROM ledger WHERE user_id = $1",
                     user)
    assert sorted(r["tx"] for r in rows) == sorted(tx_ids)
    assert (await sql(settings.db_dsn, "SELECT count(*) AS n FROM poison_events"))[0]["n"] == 0


async def cli(settings: Settings, *args: str) -> tuple[int, str]:
    """Run ``quota-gateway`` with the test's Redis and database; (exit code, output)."""
    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "DB_DSN": settings.db_dsn or "",
           "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards)}
    process = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


def listed(out: str) -> set[int]:
    """The ids a ``poison list`` shows (the first column)."""
    return {int(line.split("\t", 1)[0]) for line in out.splitlines() if line[:1].isdigit()}


async def test_a_poisoned_debit_is_replayed_into_the_ledger_once(
    own: tuple[Engine, Settings], raw_redis: aioredis.Redis
) -> None:
    """A debit set aside as poison (as a class-53 error once did) is listed, shown and
    replayed: written to the ledger with its usage, marked replayed; a second replay finds
    it there (duplicate), and a malformed entry is refused again (exit 1)."""
    engine, settings = own
    assert settings.db_dsn is not None
    user = new_user()
    reply = await engine.debit(user, "chat", 2_000_000, new_ref())
    ledger = engine.keys.ledger(engine.keys.shard(user))
    [(stream_id, fields)] = await raw_redis.xrange(ledger)
    await raw_redis.xdel(ledger, stream_id)  # set aside instead of flushed
    conn = await asyncpg.connect(settings.db_dsn)
    try:
        good = await conn.fetchval(
            "INSERT INTO poison_events (shard, stream_id, fields, error) VALUES ($1, $2, "
            "$3::jsonb, 'DiskFullError: could not extend file') RETURNING id",
            engine.keys.shard(user), stream_id, json.dumps(fields))
        bad = await conn.fetchval(
            "INSERT INTO poison_events (shard, stream_id, fields, error) VALUES (0, '1-1', "
            "$1::jsonb, 'unknown event layout') RETURNING id",
            json.dumps({"e": "v9\x1fnonsense"}))
    finally:
        await conn.close()

    code, out = await cli(settings, "poison", "list")
    assert code == 0 and listed(out) == {good, bad} and reply.tx_id in out, out
    code, out = await cli(settings, "poison", "show", str(good))
    assert code == 0 and '"kind": "debit"' in out and "DiskFullError" in out, out
    code, out = await cli(settings, "poison", "replay", str(good))
    assert (code, out.strip()) == (0, f"written: poisoned entry {good}"), out
    code, out = await cli(settings, "poison", "replay", str(good))
    assert (code, out.strip()) == (0, f"duplicate: poisoned entry {good}"), out
    code, out = await cli(settings, "poison", "replay", str(bad))
    assert code == 1 and "still refused" in out, out

    rows = await sql(settings.db_dsn, "SELECT amount_micro FROM ledger WHERE tx_id = $1::uuid",
                     reply.tx_id)
    assert [r["amount_micro"] for r in rows] == [-2_000_000]
    usage = await sql(settings.db_dsn, "SELECT sum(used_micro) AS used FROM usage_counters "
                                       "WHERE user_id = $1", user)
    assert usage[0]["used"] == 2_000_000
    code, out = await cli(settings, "poison", "list")
    assert listed(out) == {bad}, out  # only the one still waiting
    code, out = await cli(settings, "poison", "list", "--all")
    assert "replayed: written" in out, out
