"""REPORT_AT is a time of day: the reconciler's nightly report fires once it has passed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import HOUR_MS

MINUTE_MS = 60_000
#: 2026-11-25 00:00 in TIMEZONE (UTC): the scheduled report of that day totals 2026-11-24.
MIDNIGHT = int(datetime(2026, 11, 25, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture
def settings(settings: Settings, own_db_dsn: str) -> Settings:
    """A database of the test's own: the report of a day is written once per database."""
    return settings.with_overrides(db_dsn=own_db_dsn)


def _reconciler(engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path,
                report_at: str) -> tuple[Reconciler, FixedClock]:
    engine.settings = engine.settings.with_overrides(report_at=report_at,
                                                     report_dir=str(tmp_path))
    clock = engine.clock
    assert isinstance(clock, FixedClock)
    return Reconciler(engine, raw_redis, name="schedule-test"), clock


async def test_single_digit_hour_fires_at_that_hour(
    engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path
) -> None:
    """REPORT_AT=3:00 (no leading zero) is 03:00: nothing at 02:59, the report at 03:00."""
    reconciler, clock = _reconciler(engine, raw_redis, tmp_path, "3:00")
    clock.set(MIDNIGHT + 3 * HOUR_MS - MINUTE_MS)
    assert await reconciler.scheduled_report() is False
    clock.advance(MINUTE_MS)
    assert await reconciler.scheduled_report() is True
    assert (tmp_path / "reconciliation-2026-11-24.html").exists()


@pytest.mark.parametrize(("report_at", "hour", "minute", "fires"), [
    pytest.param("3:00", 10, 30, True, id="3:00 at 10:30"),
    pytest.param("9:05", 10, 0, True, id="9:05 at 10:00"),
    pytest.param("10:30", 9, 59, False, id="10:30 at 09:59"),
    pytest.param("10:30", 3, 0, False, id="10:30 at 03:00"),
])
async def test_report_time_is_compared_as_a_time_not_as_text(
    engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path, report_at: str, hour: int,
    minute: int, fires: bool
) -> None:
    """A reconciler that first looks after REPORT_AT makes the report; before it, not yet."""
    reconciler, clock = _reconciler(engine, raw_redis, tmp_path, report_at)
    clock.set(MIDNIGHT + hour * HOUR_MS + minute * MINUTE_MS)
    assert await reconciler.scheduled_report() is fires
    assert (tmp_path / "reconciliation-2026-11-24.html").exists() is fires
