"""Calendar periods in TIMEZONE, and a script clock that disagrees with the process clock.

Python computes the day and month windows (Lua has no time zone data); the script checks
them against its own clock (Redis TIME, or the time a test pins) and answers STALE_WINDOW
when they do not contain it, and the engine recomputes them from the clock the script
reported. These tests prove that the debit then lands in the counter of the script's day,
and that with a non-UTC TIMEZONE a day starts at local midnight: in Redis, in the answers,
in the ledger the reconciler writes, and in a user loaded back from PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from lua.periods import Calendar
from lua.replies import Status
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import DAY_MS, app_client, debit, new_user

MINUTE_MS = 60_000


class SkewedClock:
    """A clock whose process side and script side are set apart: ``now_ms`` is what this
    process believes (it computes the windows from it), ``script_now`` what the scripts
    get (0: Redis TIME)."""

    def __init__(self, process_ms: int, script_ms: int) -> None:
        self.process_ms = process_ms
        self.script_ms = script_ms

    def now_ms(self) -> int:
        """The process's time."""
        return self.process_ms

    def script_now(self) -> int:
        """The scripts' time (0: Redis TIME)."""
        return self.script_ms

    def set(self, ms: int) -> None:
        """Both sides at one moment (when the clocks agree)."""
        self.process_ms = self.script_ms = ms


def at(zone: str, day: date, hh: int, mm: int) -> int:
    """Epoch ms of a local wall-clock time in ``zone``."""
    return int(datetime.combine(day, time(hh, mm), tzinfo=ZoneInfo(zone)).timestamp() * 1000)


def iso_z(ms: int) -> str:
    """Epoch ms as the API writes times: ISO 8601 in UTC with a Z."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def record_debit_statuses(engine: Engine, monkeypatch: pytest.MonkeyPatch
                          ) -> list[tuple[Status, int]]:
    """Every debit_many item reply's status (and the clock a STALE_WINDOW reports)."""
    seen: list[tuple[Status, int]] = []
    scripts = engine.rt.scripts
    original = scripts.debit

    async def recorded(keys: object, **kwargs: object) -> list[object]:
        raw = await original(keys, **kwargs)  # type: ignore[arg-type]
        status = Status(raw[0])
        seen.append((status, int(raw[1]) if status is Status.STALE_WINDOW else 0))
        return raw

    monkeypatch.setattr(scripts, "debit", recorded)
    return seen


async def chat_counters(raw_redis: aioredis.Redis, engine: Engine, user: str
                        ) -> dict[str, int]:
    """The user's chat day counters in Redis: day id -> micro-units."""
    pattern = engine.keys.counter(user, "chat", "d", "*")
    return {key.rsplit(":", 1)[1]: int(await raw_redis.get(key))
            async for key in raw_redis.scan_iter(match=pattern)}


# -- STALE_WINDOW ---------------------------------------------------------------------------

#: 2026-11-23 23:59:30 UTC and a minute later, 2026-11-24 00:00:30 UTC.
BEFORE_MIDNIGHT = int(datetime(2026, 11, 23, 23, 59, 30, tzinfo=UTC).timestamp() * 1000)
AFTER_MIDNIGHT = BEFORE_MIDNIGHT + MINUTE_MS


@pytest.mark.parametrize(("process_ms", "script_ms", "script_day"), [
    (BEFORE_MIDNIGHT, AFTER_MIDNIGHT, "2026-11-24"),  # Redis's clock a minute ahead
    (AFTER_MIDNIGHT, BEFORE_MIDNIGHT, "2026-11-23"),  # this process's clock a minute ahead
], ids=["script-ahead", "process-ahead"])
async def test_a_script_clock_across_midnight_answers_stale_window_and_the_debit_lands_in_its_day(
    settings: Settings, raw_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch,
    process_ms: int, script_ms: int, script_day: str,
) -> None:
    """The process's clock and the script's straddle midnight (a minute apart): the first
    debit_many call carries the process's day and is answered STALE_WINDOW with the
    script's clock; the engine recomputes the windows from it and the debit lands in the
    script's day's counter, once (the other day's counter is untouched). A check answers
    the same way: resets_at is the end of the script's day."""
    clock = SkewedClock(BEFORE_MIDNIGHT - 2 * 3_600_000, BEFORE_MIDNIGHT - 2 * 3_600_000)
    user = new_user()
    async with app_client(settings, clock) as http:  # type: ignore[arg-type]
        engine: Engine = http.engine  # type: ignore[attr-defined]
        assert (await debit(http, user, 3)).status_code == 200  # 21:59:30 on the 23rd
        clock.process_ms, clock.script_ms = process_ms, script_ms
        seen = record_debit_statuses(engine, monkeypatch)
        response = await debit(http, user, 1)
        assert response.status_code == 200, response.text
        assert seen == [(Status.STALE_WINDOW, script_ms), (Status.OK, 0)]
        counters = await chat_counters(raw_redis, engine, user)
        if script_day == "2026-11-24":  # a fresh day: 50 - 1
            assert counters == {"2026-11-23": 3_000_000, "2026-11-24": 1_000_000}
            assert response.json()["remaining"] == 49
        else:  # still the 23rd: 50 - 3 - 1
            assert counters == {"2026-11-23": 4_000_000}
            assert response.json()["remaining"] == 46
        check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        day_end = datetime.fromisoformat(script_day).replace(tzinfo=UTC) + timedelta(days=1)
        assert check["meters"]["chat"]["resets_at"] == iso_z(int(day_end.timestamp() * 1000))
        assert check["meters"]["chat"]["remaining"] == response.json()["remaining"]


async def test_redis_time_a_day_ahead_of_the_process_clock_debits_redis_days_counter(
    settings: Settings, raw_redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Production's path: the scripts read Redis TIME (script now 0) while this process's
    clock is a day behind it. The first call is answered STALE_WINDOW with Redis's own
    time (between two TIME reads around the request), and the debit lands in the counter
    of Redis's day, not the process's."""
    seconds, micros = await raw_redis.time()
    before = seconds * 1000 + micros // 1000
    clock = SkewedClock(before - DAY_MS, 0)
    user = new_user()
    async with app_client(settings, clock) as http:  # type: ignore[arg-type]
        engine: Engine = http.engine  # type: ignore[attr-defined]
        seen = record_debit_statuses(engine, monkeypatch)
        response = await debit(http, user, 1)
        assert response.status_code == 200, response.text
        seconds, micros = await raw_redis.time()
        after = seconds * 1000 + micros // 1000
        stale = [now for status, now in seen if status is Status.STALE_WINDOW]
        assert seen[0][0] is Status.STALE_WINDOW and seen[-1] == (Status.OK, 0)
        assert all(before <= now <= after for now in stale)
        utc = Calendar("UTC")
        counters = await chat_counters(raw_redis, engine, user)
        assert list(counters.values()) == [1_000_000]
        assert next(iter(counters)) in {utc.compute(before).day_id, utc.compute(after).day_id}
        assert utc.compute(clock.now_ms()).day_id not in counters


# -- a non-UTC TIMEZONE end to end ----------------------------------------------------------

@pytest.mark.parametrize(("zone", "day"), [
    ("Asia/Tokyo", date(2026, 11, 23)),  # UTC+9: local midnight is 15:00 UTC the day before
    ("America/New_York", date(2026, 11, 1)),  # the day DST ends: 25 hours, UTC-4 then UTC-5
])
async def test_a_daily_allowance_resets_at_local_midnight_end_to_end(
    settings: Settings, raw_redis: aioredis.Redis, zone: str, day: date,
) -> None:
    """With TIMEZONE set, the free plan's 50 chat units a day are spent by 23:30 local
    and refused; at 00:10 local the next day they are back, although the UTC date has not
    changed (Tokyo) or changed hours before (New York); the UTC midnight after that resets
    nothing. Every answer's resets_at is the next local midnight. The reconciler flushes
    the usage under the local days' period ids, and a user loaded back from PostgreSQL
    finds the local day's usage."""
    local = settings.with_overrides(timezone=zone)
    next_day = day + timedelta(days=1)
    late, early = at(zone, day, 23, 30), at(zone, next_day, 0, 10)
    next_midnight, following_midnight = at(zone, next_day, 0, 0), at(zone, day + timedelta(2), 0, 0)
    utc_midnight = (early // DAY_MS + 1) * DAY_MS  # the first UTC midnight after `early`
    assert utc_midnight < following_midnight
    month_end = at(zone, date(2026, 12, 1), 0, 0)
    clock = FixedClock(late)
    user = new_user()
    async with app_client(local, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        spent = await debit(http, user, 50)
        assert spent.status_code == 200 and spent.json()["remaining"] == 0, spent.text
        assert (await debit(http, user, 1)).status_code == 403
        check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert check["meters"]["chat"]["resets_at"] == iso_z(next_midnight)
        assert check["meters"]["pages"]["resets_at"] == iso_z(month_end)  # a monthly meter

        clock.set(early)
        fresh = await debit(http, user, 1)
        assert fresh.status_code == 200 and fresh.json()["remaining"] == 49, fresh.text
        check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert check["meters"]["chat"]["resets_at"] == iso_z(following_midnight)

        clock.set(utc_midnight + 10 * MINUTE_MS)  # UTC has a new date, the local day goes on
        again = await debit(http, user, 1)
        assert again.status_code == 200 and again.json()["remaining"] == 48, again.text
        assert await chat_counters(raw_redis, engine, user) == {
            day.isoformat(): 50_000_000, next_day.isoformat(): 2_000_000}

        reconciler = Reconciler(engine, raw_redis, name="tz-consumer")
        await reconciler.drain()
        async with engine.db.connection() as conn:
            usage = await conn.fetch("SELECT period_id, used_micro FROM usage_counters "
                                     "WHERE user_id = $1 AND meter = 'chat'", user)
            ledger = await conn.fetch("SELECT period_id, count(*) AS n FROM ledger WHERE "
                                      "user_id = $1 AND kind = 'debit' GROUP BY period_id", user)
        assert {r["period_id"]: r["used_micro"] for r in usage} == {
            f"d:{day}": 50_000_000, f"d:{next_day}": 2_000_000}
        assert {r["period_id"]: r["n"] for r in ledger} == {f"d:{day}": 1, f"d:{next_day}": 2}

        keys = [k async for k in raw_redis.scan_iter(match=f"{engine.keys.user(user)}*")]
        assert await raw_redis.delete(*keys) >= 3  # Redis lost the user: it is loaded again
        check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert check["meters"]["chat"]["remaining"] == 48
        assert check["meters"]["chat"]["resets_at"] == iso_z(following_midnight)
