"""The ledger at volume: monthly partitions, raw rows pruned past the retention into daily
rollups, and the readers (history, report, rebuild) adding the two (migration 0012)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock, to_ms
from core.settings import Settings
from persistence import ledger
from persistence.db import Database
from persistence.migrate import migrate
from quota.engine import Engine
from reconciler import report
from reconciler.main import Reconciler
from tests.support import app_client, debit, new_ref, new_user, put_plan, unique_plan

CREDIT = "/internal/billing/quota/credit"


def at(iso: str) -> datetime:
    """An ISO time in UTC."""
    return datetime.fromisoformat(iso).replace(tzinfo=UTC)


async def _rows(conn: asyncpg.Connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await conn.fetch(sql, *args)]


async def _history(http: httpx.AsyncClient, user: str, limit: int) -> list[dict[str, Any]]:
    """Every row of the user's history, page by page."""
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = (await http.get("/internal/billing/transactions", params={
            "user_id": user, "limit": limit, "before": cursor})).json()
        items += page["transactions"]
        if not page["next_before"]:
            return items
        cursor = page["next_before"]


async def _schema(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """The ledger tables' columns, constraints and indexes, as text."""
    columns = await _rows(conn, """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns
        WHERE table_name IN ('ledger', 'ledger_debit_keys', 'ledger_daily')
        ORDER BY 1, ordinal_position""")
    constraints = await _rows(conn, """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid IN ('ledger'::regclass, 'ledger_debit_keys'::regclass,
                           'ledger_daily'::regclass) ORDER BY 1, 2""")
    indexes = await _rows(conn, """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE tablename IN ('ledger', 'ledger_debit_keys', 'ledger_daily') ORDER BY 1, 2""")
    return columns + constraints + indexes


async def test_migration_0012_moves_a_ledger_with_data_in_place(
    blank_db_dsn: str, own_db_dsn: str,
) -> None:
    """A ledger of every kind, months apart, is partitioned in place: every row is there
    as it was, in the partition of its kind and month; the debits' keys are taken over, so
    a second debit of a (user, ref, round) and a redelivered event still insert nothing;
    and the schema is the one a fresh install builds."""
    conn = await asyncpg.connect(blank_db_dsn)
    try:
        await migrate(conn, until=11)
        rows = [("debit", at("2026-09-03T10:00:00"), "r-1", 0),
                ("debit", at("2026-10-31T23:59:59"), "r-1", 1),
                ("hold", at("2026-10-15T00:00:00"), "h-1", 0),
                ("credit", at("2025-01-01T00:00:00"), "order-1", 0),
                ("plan", at("2026-11-02T00:00:00"), None, 0)]
        for kind, when, ref, ref_round in rows:
            debit_ = kind == "debit"
            await conn.execute(
                "INSERT INTO ledger (tx_id, kind, user_id, meter, amount_micro, "
                "from_allowance_micro, ref, ref_round, period_id, occurred_at) "
                "VALUES ($1, $2, 'u-1', 'chat', $3, $4, $5, $6, 'm:2026-10', $7)",
                uuid.uuid4(), kind, -5 if debit_ else 7, 5 if debit_ else 0, ref, ref_round,
                when)
        records = [dict(r) for r in await conn.fetch("SELECT * FROM ledger "
                                                     "ORDER BY occurred_at")]
        await migrate(conn)
        assert [dict(r) for r in await conn.fetch("SELECT * FROM ledger "
                                                  "ORDER BY occurred_at")] == records
        assert await _rows(conn, "SELECT tableoid::regclass::text, kind FROM ledger "
                                 "ORDER BY occurred_at") == [
            ("ledger_money", "credit"), ("ledger_flow_2026_09", "debit"),
            ("ledger_flow_2026_10", "hold"), ("ledger_flow_2026_10", "debit"),
            ("ledger_money", "plan")]
        assert await _rows(conn, "SELECT user_id, ref, ref_round FROM ledger_debit_keys "
                                 "ORDER BY ref_round") == [("u-1", "r-1", 0), ("u-1", "r-1", 1)]
        # The 2026-09 debit redelivered (same tx, kind, time), then another debit of its
        # (user, ref, round) with another tx and time: neither is written.
        again = records[1]
        other = again | {"tx_id": uuid.uuid4(), "occurred_at": at("2026-11-20T00:00:00")}
        db = Database(blank_db_dsn, min_size=0, max_size=1, timeout=10)
        try:
            for e in (again, other):
                assert await db.fetchval(
                    "flush_events", [e["tx_id"]], [e["kind"]], [e["user_id"]], [e["meter"]],
                    [e["amount_micro"]], [e["from_allowance_micro"]],
                    [e["from_credits_micro"]], [e["period_id"]], [e["ref"]], [None], [""],
                    [None], [None], [None], [None], [e["occurred_at"]], [None],
                    [e["ref_round"]]) == 0
        finally:
            await db.close()
        assert await conn.fetchval("SELECT count(*) FROM ledger") == 5
        fresh = await asyncpg.connect(own_db_dsn)
        try:
            assert await _schema(conn) == await _schema(fresh)
        finally:
            await fresh.close()
    finally:
        await conn.close()


async def test_partitions_are_created_ahead_and_take_rows_out_of_the_default(
    own_db_dsn: str,
) -> None:
    """A debit of a month without a partition lands in the default partition (the safety
    net); creating the partitions ahead (this month and two more) moves it into its
    month's, and creating them again creates nothing."""
    db = Database(own_db_dsn, min_size=0, max_size=1, timeout=10)
    try:
        tx = uuid.uuid4()
        when = at("2030-06-15T00:00:00")
        assert await db.fetchval(
            "flush_events", [tx], ["debit"], ["u-1"], ["chat"], [-1], [1], [0], ["d"],
            ["r-1"], [None], [""], [None], [None], [None], [None], [when], [0], [0]) == 1
        where = "SELECT tableoid::regclass::text FROM ledger WHERE tx_id = $1"
        assert await db.fetchval("ledger_missing_tx", [tx]) is None
        async with db.connection() as conn:
            assert await conn.fetchval(where, tx) == "ledger_flow_default"
        assert await ledger.ensure_partitions(db, at("2030-05-31T23:00:00"), 2) == 3
        assert await ledger.ensure_partitions(db, at("2030-05-31T23:00:00"), 2) == 0
        async with db.connection() as conn:
            assert await conn.fetchval(where, tx) == "ledger_flow_2030_06"
        names = {r["name"] for r in await db.fetch("ledger_partitions")}
        assert {"ledger_flow_2030_05", "ledger_flow_2030_06", "ledger_flow_2030_07",
                "ledger_money", "ledger_flow_default"} <= names
    finally:
        await db.close()


async def test_pruned_months_are_rolled_up_and_every_reader_adds_both(
    settings: Settings, own_db_dsn: str, raw_redis: aioredis.Redis,
) -> None:
    """A user buys a 120-day plan (a cycle allowance and credits) in March and debits in
    March and April. In May, with a 30-day retention, the reconciler's chores roll March up
    and drop it: the raw March debits are gone, their daily totals stay; the plan and credit
    rows (money) stay raw. The history pages across raw rows and rollups with the same sums,
    the report of a March day has the same totals as before, and a user rebuilt from
    PostgreSQL has the same usage and credits. Pruning again changes nothing."""
    settings = settings.with_overrides(db_dsn=own_db_dsn, ledger_retention_days=30)
    clock = FixedClock(to_ms(at("2027-03-05T10:00:00")))
    code, user = unique_plan(), new_user()
    async with app_client(settings, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        await put_plan(http, code, {"chat": {"limit": 1000, "period": "cycle"}}, 120)
        bought = await http.post(CREDIT, json={"order_id": new_ref(), "user_id": user,
                                               "plan_code": code, "units_chat": 500,
                                               "units_tpl": 0})
        assert bought.status_code == 200, bought.text
        for units, when in ((300, "2027-03-05T10:00:00"), (300, "2027-03-05T11:00:00"),
                            (600, "2027-03-20T23:30:00"), (10, "2027-04-15T08:00:00")):
            clock.set(to_ms(at(when)))
            assert (await debit(http, user, units)).status_code == 200
            await Reconciler(engine, raw_redis, name="volume").drain()
        march_day = date(2027, 3, 5)
        totals_before = (await report.build(engine, raw_redis, march_day)).totals
        history_before = await _history(http, user, 100)

        clock.set(to_ms(at("2027-05-10T00:00:00")))
        check_before = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        await Reconciler(engine, raw_redis, name="volume").drain()  # chores: prune
        async with engine.db.connection() as conn:
            assert await _rows(conn, "SELECT kind, count(*) FROM ledger WHERE user_id = $1 "
                                     "GROUP BY 1 ORDER BY 1", user) == [
                ("credit", 1), ("debit", 1), ("plan", 1)]
            assert await _rows(conn, "SELECT day, kind, events, amount_micro, "
                                     "from_allowance_micro, from_credits_micro "
                                     "FROM ledger_daily WHERE user_id = $1 ORDER BY day",
                               user) == [
                (date(2027, 3, 5), "debit", 2, -600_000_000, 600_000_000, 0),
                (date(2027, 3, 20), "debit", 1, -600_000_000, 400_000_000, 200_000_000)]
            assert await conn.fetchval("SELECT to_regclass('ledger_flow_2027_03')") is None
            assert await conn.fetchval("SELECT count(*) FROM ledger_debit_keys "
                                       "WHERE user_id = $1", user) == 1
            daily = await _rows(conn, "SELECT * FROM ledger_daily ORDER BY 1, 2")

        history = await _history(http, user, 2)  # pages across raw rows and rollups
        rows = [(h["kind"], h["rolled_up"], h["events"]) for h in history]
        assert rows[:2] + sorted(rows[2:4]) + rows[4:] == [
            ("debit", False, 1),  # 15 April
            ("debit", True, 1),  # 20 March, at the day's start
            ("credit", False, 1), ("plan", False, 1),  # 5 March, 10:00
            ("debit", True, 2)]  # 5 March, at the day's start
        assert history[1]["occurred_at"] == "2027-03-20T00:00:00+00:00"

        def debited(items: list[dict[str, Any]]) -> Decimal:
            return sum((Decimal(h["amount"]) for h in items if h["kind"] == "debit"),
                       Decimal(0))

        assert debited(history) == debited(history_before) == Decimal(-1210)
        assert (await report.build(engine, raw_redis, march_day)).totals == totals_before
        assert totals_before[0]["debits"] == 2 and totals_before[0]["amount"] == "600"

        keys = [k async for k in raw_redis.scan_iter(match=f"{engine.keys.user(user)}*")]
        assert await raw_redis.delete(*keys) >= 2  # the state and the cycle counter
        rebuilt = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert rebuilt["meters"]["chat"] == check_before["meters"]["chat"]
        assert check_before["meters"]["chat"]["credits"] == 290  # 500 - 200 - 10
        assert check_before["meters"]["chat"]["used"] == 1000

        now = datetime.fromtimestamp(clock.now_ms() / 1000, tz=UTC)
        assert await ledger.prune(engine.db, now, 30, settings.timezone) == []
        async with engine.db.connection() as conn:
            assert await _rows(conn, "SELECT * FROM ledger_daily ORDER BY 1, 2") == daily


async def test_a_prune_cut_short_after_the_detach_is_finished_by_the_next(
    own_db_dsn: str,
) -> None:
    """A prune that stopped between its two steps leaves a detached month: the next prune
    rolls it up and drops it before it detaches anything else, and no row is counted
    twice or lost."""
    db = Database(own_db_dsn, min_size=0, max_size=1, timeout=10)
    try:
        await ledger.prune(db, at("2031-01-02T00:00:00"), 1, "UTC")  # the months before
        await ledger.ensure_partitions(db, at("2031-01-01T00:00:00"), 2)
        for i, when in enumerate(("2031-01-10T00:00:00", "2031-02-10T00:00:00")):
            assert await db.fetchval(
                "flush_events", [uuid.uuid4()], ["debit"], ["u-1"], ["chat"], [-2], [2], [0],
                ["d"], [f"r-{i}"], [None], [""], [None], [None], [None], [None], [at(when)],
                [0], [0]) == 1
        async with db.transaction() as conn:
            assert await conn.fetchval("SELECT ledger_detach_oldest($1)",
                                       at("2031-02-01T00:00:00")) == "ledger_flow_2031_01"
        dropped = await ledger.prune(db, at("2031-03-05T00:00:00"), 2, "UTC")
        assert dropped == ["ledger_flow_2031_01", "ledger_flow_2031_02"]
        async with db.connection() as conn:
            assert await _rows(conn, "SELECT day, events, amount_micro FROM ledger_daily "
                                     "WHERE day >= '2031-01-01' ORDER BY day") == [
                (date(2031, 1, 10), 1, -2), (date(2031, 2, 10), 1, -2)]
            assert await conn.fetchval("SELECT count(*) FROM ledger WHERE user_id = 'u-1' "
                                       "AND occurred_at >= '2031-01-01'") == 0
    finally:
        await db.close()


def test_the_ledger_commands_list_partitions_and_prune_past_the_retention(
    own_db_dsn: str,
) -> None:
    """`quota-gateway ledger partitions` creates this month's partition and the next ones
    and lists them; `ledger prune` refuses without a retention, and with one rolls up and
    drops a month that ended longer ago (by the real clock), naming it."""
    from click.testing import CliRunner

    from ops.cli import main

    async def old_debit() -> None:
        db = Database(own_db_dsn, min_size=0, max_size=1, timeout=10)
        try:
            await ledger.ensure_partitions(db, at("2026-01-15T00:00:00"), 0)
            assert await db.fetchval(
                "flush_events", [uuid.uuid4()], ["debit"], ["u-cli"], ["chat"], [-3], [3],
                [0], ["d"], ["r-1"], [None], [""], [None], [None], [None], [None],
                [at("2026-01-15T00:00:00")], [0], [0]) == 1
        finally:
            await db.close()

    asyncio.run(old_debit())
    env = {"DB_DSN": own_db_dsn, "LEDGER_PARTITIONS_AHEAD": "3"}
    listed = CliRunner().invoke(main, ["ledger", "partitions"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "partitions created: " in listed.output
    names = [line.split("\t")[0] for line in listed.output.splitlines()[1:]]
    later = months_after_now(3)
    assert {"ledger_money", "ledger_flow_default", "ledger_flow_2026_01", later} <= set(names)
    refused = CliRunner().invoke(main, ["ledger", "prune"], env=env)
    assert refused.exit_code == 1 and "LEDGER_RETENTION_DAYS is 0" in refused.output
    pruned = CliRunner().invoke(main, ["ledger", "prune", "--retention-days", "8"], env=env)
    assert pruned.exit_code == 0, pruned.output
    assert "ledger_flow_2026_01" in pruned.output
    again = CliRunner().invoke(main, ["ledger", "prune", "--retention-days", "8"], env=env)
    assert "none (nothing that old)" in again.output


def months_after_now(months: int) -> str:
    """The partition name of the month ``months`` after this one (by the real clock)."""
    first = ledger.months_after(datetime.now(tz=UTC), months)
    return f"ledger_flow_{first:%Y_%m}"


async def test_the_flush_goes_on_while_the_ledger_maintenance_waits(
    settings: Settings, own_db_dsn: str, raw_redis: aioredis.Redis,
) -> None:
    """The reconciler's ledger maintenance runs beside the flush: while its rollup waits
    (another session holds the rollup lock, as a long rollup elsewhere would), debits are
    still flushed; once the lock is free the maintenance drops the month past the
    retention."""
    settings = settings.with_overrides(db_dsn=own_db_dsn, ledger_retention_days=30)
    clock = FixedClock(to_ms(at("2027-05-10T00:00:00")))
    user = new_user()
    blocker = await asyncpg.connect(own_db_dsn)
    try:
        async with app_client(settings, clock) as http:
            engine: Engine = http.engine  # type: ignore[attr-defined]
            await ledger.ensure_partitions(engine.db, at("2027-03-01T00:00:00"), 0)
            await blocker.execute("BEGIN")
            await blocker.fetchval("SELECT pg_advisory_xact_lock(7311005)")  # the rollup's
            reconciler = Reconciler(engine, raw_redis, name="volume")
            assert (await debit(http, user, 1)).status_code == 200
            async with asyncio.timeout(30):  # a maintenance run inline would hang here
                await reconciler.step()  # flushes, then starts the maintenance
                maintenance = reconciler._ledger_task
                assert maintenance is not None and reconciler.stats.inserted == 1
                assert (await debit(http, user, 1)).status_code == 200
                for _ in range(10):
                    await reconciler.step()
                    if reconciler.stats.inserted == 2:
                        break
            assert reconciler.stats.inserted == 2 and not maintenance.done()
            await blocker.execute("COMMIT")
            assert await maintenance is True
            async with engine.db.connection() as conn:
                assert await conn.fetchval("SELECT to_regclass('ledger_flow_2027_03')") is None
                assert await conn.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1",
                                           user) == 2
    finally:
        await blocker.close()
