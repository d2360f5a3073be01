"""The nightly report: clean after a normal run, non-zero on injected drift.

The report reads the whole database (every debit and succeeded receipt of the day, the
flushed usage of the open periods, the summary row of a day), so each test here runs on a
database of its own: its counts are exact whatever other tests left in the session's."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from reconciler.report import run
from tests.support import DAY_MS, HOUR_MS, T0, apply_plan, balance_debit, debit, new_user


@pytest.fixture
def settings(settings: Settings, own_db_dsn: str) -> Settings:
    """The test's settings on a database of its own (engine, client and CLI use it)."""
    return settings.with_overrides(db_dsn=own_db_dsn)


async def test_report_is_clean_then_finds_injected_drift(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Totals are exactly the day's flushed debits (3 of 2 chat, 1 of 0.5 units; the
    unflushed one counted as unflushed, not in the totals), both counters agree, no
    payments; a counter nudged by 5 in Redis is reported as exactly that one drift."""
    user, other = new_user(), new_user()
    await apply_plan(client, other, "base750", expires_at="2027-01-01T00:00:00Z")
    for _ in range(3):
        assert (await debit(client, user, 2)).status_code == 200
    assert (await balance_debit(client, other, 0.5)).status_code == 200
    await Reconciler(engine, raw_redis, name="report-test").drain()
    assert (await debit(client, user, 1)).status_code == 200  # left unflushed on purpose

    clean = await run(engine, raw_redis, date(2026, 11, 23), tmp_path / "clean")
    assert clean.drift_count == 0, clean.drift
    assert clean.unflushed_entries == 1
    assert clean.totals == [
        {"plan_code": "base750", "meter": "units", "debits": 1, "amount": "0.5",
         "from_allowance": "0.5", "from_credits": "0"},
        {"plan_code": "free", "meter": "chat", "debits": 3, "amount": "6",
         "from_allowance": "6", "from_credits": "0"},
    ]
    assert clean.counters_checked == 2  # user's chat day, other's units
    assert (clean.payments_checked, clean.payment_mismatches) == (0, [])
    files = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert files == ["reconciliation-2026-11-23-drift.csv", "reconciliation-2026-11-23-totals.csv",
                     "reconciliation-2026-11-23.html", "reconciliation-2026-11-23.json"]
    page = (tmp_path / "clean" / "reconciliation-2026-11-23.html").read_text()
    assert "<svg" in page and "no drift" in page

    day_key, _ = engine.keys.counters(user, "chat", engine.calendar.windows(engine.clock.now_ms()))
    await raw_redis.incrby(day_key, 5_000_000)
    drifted = await run(engine, raw_redis, date(2026, 11, 23), tmp_path / "drift")
    assert [(d["user_id"], d["meter"], d["difference"]) for d in drifted.drift] == [
        (user, "chat", "5")]
    saved = orjson.loads((tmp_path / "drift" / "reconciliation-2026-11-23.json").read_bytes())
    assert saved["drift_count"] == 1
    assert drifted.drift[0]["redis"] == "12" and drifted.drift[0]["unflushed"] == "1"
    async with engine.db.connection() as conn:
        rows = await conn.fetch("SELECT drift_count FROM reconciliation_reports "
                                "WHERE report_date = $1 ORDER BY id", date(2026, 11, 23))
    assert [r["drift_count"] for r in rows] == [0, 1]  # one summary row per run

    # base750's units are a cycle: its counter is checked under the cycle's period id
    [start] = [k.rsplit(":y:", 1)[1] async for k in raw_redis.scan_iter(
        match=f"{engine.keys.user(other)}:c:units:y:*")]
    await raw_redis.incrby(f"{engine.keys.user(other)}:c:units:y:{start}", 250_000)
    cycled = await run(engine, raw_redis, date(2026, 11, 23), tmp_path / "cycle")
    assert [(d["user_id"], d["meter"], d["period"], d["difference"]) for d in cycled.drift
            if d["user_id"] == other] == [(other, "units", f"y:{start}", "0.25")]


async def test_scheduled_report_runs_once_after_its_time(
    engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path
) -> None:
    """With REPORT_AT 03:00, nothing before it; after it yesterday's report, only once."""
    from core.clock import FixedClock

    settings = engine.settings.with_overrides(report_at="03:00", report_dir=str(tmp_path))
    engine.settings = settings
    clock = engine.clock
    assert isinstance(clock, FixedClock)
    clock.set(T0 + DAY_MS + 15 * HOUR_MS)  # 2026-11-25 03:00 UTC -> reports 2026-11-24
    reconciler = Reconciler(engine, raw_redis, name="sched-test")
    clock.advance(-60_000)
    assert await reconciler.scheduled_report() is False
    clock.advance(60_000)
    assert await reconciler.scheduled_report() is True
    assert await reconciler.scheduled_report() is False
    assert (tmp_path / "reconciliation-2026-11-24.html").exists()


def test_report_command_exit_code_says_drift(settings: Settings, tmp_path: Path) -> None:
    """`quota-gateway report` exits 0 when clean (nothing to check on an empty database)
    and 1 once a Redis counter drifts: exactly that one counter."""
    import time

    import redis
    from click.testing import CliRunner

    from lua.keys import Keys
    from lua.periods import Calendar
    from ops.cli import main

    env = {"REDIS_URL": settings.redis_url or "", "DB_DSN": settings.db_dsn or "",
           "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards)}
    args = ["report", "--date", "2026-11-23", "--out", str(tmp_path)]
    clean = CliRunner().invoke(main, args, env=env)
    assert clean.exit_code == 0, clean.output
    assert "0 plan/meter totals, 0 counters checked, 0 drifting" in clean.output
    windows = Calendar("UTC").windows(time.time_ns() // 1_000_000)  # the command's real clock
    key = Keys(settings.key_prefix, settings.n_shards).counters("drifter", "chat", windows)[0]
    client = redis.Redis.from_url(settings.redis_url or "")
    client.set(key, 3_000_000, px=60_000)  # usage Redis has and the ledger never saw
    client.close()
    drifted = CliRunner().invoke(main, args, env=env)
    assert drifted.exit_code == 1, drifted.output
    assert "0 plan/meter totals, 1 counters checked, 1 drifting" in drifted.output


async def test_report_reconciles_holds(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path,
    own_db_dsn: str
) -> None:
    """The day's holds counted by outcome, a settle's usage in the drift check (an
    unflushed settle is pending usage, not drift), and a hold whose closing the ledger
    lacks, or one left open far past its expiry, reported as a mismatch."""
    import asyncpg

    q = "/internal/billing/quota"
    user = new_user()

    async def reserve(units: int, ttl_s: int = 60) -> str:
        answer = await client.post(f"{q}/reserve", json={
            "user_id": user, "action": "chat_tokens", "units": units, "ref": new_user(),
            "ttl_s": ttl_s})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["hold_id"])

    settled, released = await reserve(10), await reserve(5)
    await reserve(5, 1)  # left to expire
    assert (await client.post(f"{q}/settle", json={"hold_id": settled, "units": 7})
            ).status_code == 200
    assert (await client.post(f"{q}/release", json={"hold_id": released})).status_code == 200
    reconciler = Reconciler(engine, raw_redis, name="report-holds")
    engine.clock.advance(2_000)  # type: ignore[attr-defined]
    await reconciler.expire_holds()
    await reconciler.drain()
    late = await reserve(3)
    assert (await client.post(f"{q}/settle", json={"hold_id": late, "units": 2})
            ).status_code == 200  # left unflushed: its usage is pending, not drift

    report = await run(engine, raw_redis, date(2026, 11, 23), tmp_path / "holds")
    assert report.drift_count == 0, (report.drift, report.hold_mismatches)
    assert report.holds == {"created": 3, "settled": 1, "released": 1, "expired": 1,
                            "open_now": 0, "settled_units": "7"}
    await reconciler.drain()

    conn = await asyncpg.connect(own_db_dsn)
    try:  # the ledger loses a settle; a hold stays open long past its expiry
        await conn.execute("DELETE FROM ledger WHERE ref = $1 AND kind = 'commit'", settled)
        await conn.execute("UPDATE holds SET state = 'open', closed_at = NULL, "
                           "settle_tx = NULL, expires_at = now() - interval '1 hour' "
                           "WHERE hold_id = $1", released)
    finally:
        await conn.close()
    bad = await run(engine, raw_redis, date(2026, 11, 23), tmp_path / "bad")
    assert sorted((m["hold_id"], m["state"]) for m in bad.hold_mismatches) == sorted(
        [(settled, "settled"), (released, "open")])
    assert bad.drift_count == 2
