"""Calendar windows: the day and month a moment falls in, in the configured time zone.

Period counters are named after their period (``d:2026-11-23``, ``m:2026-11``) and expire
after its end, so resets need no cron job. Python computes the windows (Lua has no time
zone database); the scripts check that Redis' own clock falls inside them.
"""

from __future__ import annotations

import functools
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta


@dataclass(frozen=True, slots=True)
class Windows:
    """The day and month containing one moment, as ids and [start, end) in epoch ms."""

    day_id: str
    day_start_ms: int
    day_end_ms: int
    month_id: str
    month_start_ms: int
    month_end_ms: int

    def contains(self, now_ms: int) -> bool:
        """True when both windows contain the moment."""
        return (
            self.day_start_ms <= now_ms < self.day_end_ms
            and self.month_start_ms <= now_ms < self.month_end_ms
        )

    def period_id(self, period: str) -> str:
        """The ledger's id for a period kind ('d', 'm' or 'n')."""
        if period == "d":
            return f"d:{self.day_id}"
        if period == "m":
            return f"m:{self.month_id}"
        return "n"

    def period_end_ms(self, period: str) -> int:
        """When a calendar period kind's current period ends (0 for 'n', which never resets;
        a cycle, 'y', ends with its plan: the loader takes that from the plan)."""
        return {"d": self.day_end_ms, "m": self.month_end_ms}.get(period, 0)


def _epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _midnight(day: date, zone: zoneinfo.ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone)


class Calendar:
    """Computes and caches the windows of the current moment in one time zone."""

    def __init__(self, timezone: str) -> None:
        self.zone = zoneinfo.ZoneInfo(timezone)
        self._cached: Windows | None = None

    def windows(self, now_ms: int) -> Windows:
        """The windows containing ``now_ms``, recomputed only when it leaves the cached ones."""
        cached = self._cached
        if cached is not None and cached.contains(now_ms):
            return cached
        fresh = self.compute(now_ms)
        self._cached = fresh
        return fresh

    def compute(self, now_ms: int) -> Windows:
        """The windows containing ``now_ms`` (pure; DST-safe: day lengths vary)."""
        local = datetime.fromtimestamp(now_ms / 1000, tz=UTC).astimezone(self.zone)
        today = local.date()
        month_start = today.replace(day=1)
        next_month = (month_start + timedelta(days=32)).replace(day=1)
        return Windows(
            day_id=today.isoformat(),
            day_start_ms=_epoch_ms(_midnight(today, self.zone)),
            day_end_ms=_epoch_ms(_midnight(today + timedelta(days=1), self.zone)),
            month_id=f"{today.year:04d}-{today.month:02d}",
            month_start_ms=_epoch_ms(_midnight(month_start, self.zone)),
            month_end_ms=_epoch_ms(_midnight(next_month, self.zone)),
        )

    @staticmethod
    def iso(epoch_ms: int) -> str:
        """An epoch ms as ISO 8601 in UTC, with a Z."""
        return _iso(epoch_ms)


@functools.lru_cache(maxsize=4096)
def _iso(epoch_ms: int) -> str:
    """``Calendar.iso``, remembered: the times a check shows are few (period ends, plan
    expiries), and formatting one costs more than the rest of its meter's answer."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
