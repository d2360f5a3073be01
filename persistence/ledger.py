"""The ledger's monthly partitions: created ahead, and past the retention rolled up and dropped.

The SQL is in migration 0012 (functions) and queries.sql; see docs/architecture.md, "The
ledger at volume". Both steps are idempotent and serialized by an advisory lock, so every
reconciler may run them, and ``quota-gateway ledger`` too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from persistence.db import Database
from persistence.queries import QUERIES

#: The most partitions one prune removes (a bound, not a goal: a month a call).
MAX_PRUNED_PER_CALL = 1200
#: A month's rollup reads every row of it (tens of billions at 5,000 debits/s); creating a
#: partition may move rows out of the default one. Far past DB_TIMEOUT_SECONDS.
MAINTENANCE_TIMEOUT_SECONDS = 6 * 3600.0


def months_after(moment: datetime, months: int) -> datetime:
    """The first instant (UTC) of the month ``months`` after ``moment``'s."""
    at = moment.astimezone(UTC)
    index = at.year * 12 + at.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def ensure_partitions(db: Database, now: datetime, months_ahead: int) -> int:
    """Create the partitions of this month and the next ``months_ahead``; how many were new."""
    async with db.transaction() as conn:
        return int(await conn.fetchval(QUERIES["ledger_ensure_partitions"], now,
                                       months_after(now, months_ahead),
                                       timeout=MAINTENANCE_TIMEOUT_SECONDS))


def retention_cutoff(now: datetime, retention_days: int) -> datetime:
    """Raw rows older than this may go: now minus the retention."""
    return now - timedelta(days=retention_days)


async def prune(db: Database, now: datetime, retention_days: int, zone: str) -> list[str]:
    """Roll up and drop every monthly partition that ended ``retention_days`` before ``now``
    (days of the rollups in ``zone``); the names dropped, oldest first. A partition
    detached by an earlier call that stopped half-way is finished first."""
    assert retention_days > 0, "0 means keep raw rows for good: nothing to prune"
    cutoff = retention_cutoff(now, retention_days)
    dropped: list[str] = []
    while len(dropped) < MAX_PRUNED_PER_CALL:
        async with db.transaction() as conn:  # the long step: rollup, keys, drop
            name = await conn.fetchval(QUERIES["ledger_rollup_detached"], zone,
                                       timeout=MAINTENANCE_TIMEOUT_SECONDS)
        if name is not None:
            dropped.append(name)
            continue
        async with db.transaction() as conn:  # the brief step: detach
            detached = await conn.fetchval(QUERIES["ledger_detach_oldest"], cutoff,
                                           timeout=MAINTENANCE_TIMEOUT_SECONDS)
        if detached is None:
            break
    return dropped
