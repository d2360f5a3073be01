"""The reconciler loop: flush the shard streams to PostgreSQL, apply pending write-throughs.

One iteration: read new entries (blocking up to FLUSH_BLOCK_MS), write them in batches of at
most FLUSH_BATCH_MAX in one transaction each, then XACK + XDEL them. Every so often: take
over entries a dead consumer left behind, publish the lag, and apply write-through changes
(plans, credits) that committed in PostgreSQL but never reached Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from core import metrics
from core.errors import DependencyUnavailable
from core.settings import report_time
from persistence import ledger
from persistence.db import PostgresUnavailable
from persistence.migrate import schema_behind
from persistence.queries import QUERIES
from quota.engine import Engine
from reconciler.consumer import Entry, StreamConsumer
from reconciler.writer import LedgerWriter

log = logging.getLogger("quota_gateway.reconciler")

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError,
              redis.exceptions.RedisClusterException, redis.exceptions.ClusterError,
              redis.exceptions.TryAgainError)  # a cluster mid-failover
MAX_BACKOFF_SECONDS = 5.0
OUTBOX_MIN_AGE = timedelta(seconds=2)  # let the request apply its own change first
OUTBOX_BATCH = 100
#: How often shard catalog copies are compared with PostgreSQL's catalog (a repair path for
#: a plan change whose copy Redis cut short; 256 reads each time).
CATALOG_RESYNC_SECONDS = 30.0
#: How often the ledger's partitions are created ahead and, with a retention, pruned; and
#: how soon a failed attempt is made again (the flush goes on meanwhile).
LEDGER_MAINTENANCE_SECONDS = 3600.0
LEDGER_RETRY_SECONDS = 60.0


@dataclass
class Stats:
    """Totals since start (tests and logs read them)."""

    inserted: int = 0
    duplicates: int = 0
    ref_conflicts: int = 0
    ref_reuses: int = 0
    poisoned: int = 0
    batches: int = 0
    outbox_applied: int = 0
    errors: list[str] = field(default_factory=list)


def consumer_name() -> str:
    """One consumer name per process: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


#: Holds still open in PostgreSQL this long past their expiry belong to users whose state
#: left Redis first: the reconciler loads them (at most this many a round) to expire them.
OVERDUE_HOLD_GRACE = timedelta(minutes=1)
OVERDUE_HOLD_USERS = 100


class Reconciler:
    """Owns one consumer, one writer and the periodic chores."""

    def __init__(self, engine: Engine, redis: aioredis.Redis, *, name: str | None = None,
                 claim_every_seconds: float | None = None) -> None:
        s = engine.settings
        self.engine = engine
        self.settings = s
        self.redis = redis
        self.consumer = StreamConsumer(
            redis, engine.keys, name or consumer_name(),
            per_stream_count=max(10, s.flush_batch_max // 8), block_ms=s.flush_block_ms,
            claim_idle_ms=s.flush_claim_idle_ms,
        )
        self.writer = LedgerWriter(engine.db, timedelta(seconds=s.idempotency_ttl_seconds))
        self.stats = Stats()
        #: A change younger than this is left to the request that committed it.
        self.outbox_min_age = OUTBOX_MIN_AGE
        self.claim_every = claim_every_seconds or max(1.0, s.flush_claim_idle_ms / 4000)
        #: REPORT_AT as (hour, minute) in TIMEZONE; None: no scheduled report.
        self.report_time = report_time(s.report_at)
        self._next_claim = 0.0
        self._next_chores = 0.0
        self._next_resync = 0.0
        self._next_holds = 0.0
        self._next_ledger = 0.0
        self._ledger_task: asyncio.Task[bool] | None = None
        self._lag_gauges = [(metrics.FLUSH_LAG_ENTRIES.labels(str(shard)),
                             metrics.FLUSH_LAG_SECONDS.labels(str(shard)))
                            for shard in range(s.n_shards)]
        self._groups_ready = False
        self._schema_ready = False
        self._retry: list[Entry] = []

    async def flush(self, entries: list[Entry]) -> None:
        """Write entries in batches, each acknowledged only after it committed."""
        size = self.settings.flush_batch_max
        for i in range(0, len(entries), size):
            batch = entries[i : i + size]
            started = time.perf_counter()
            try:
                written = await self.writer.write(batch)
                await self.consumer.done(batch)
            except BaseException:
                # Still pending in the stream: retried first on the next step, never skipped.
                self._retry = entries[i:]
                raise
            metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
            metrics.FLUSH_BATCH_SIZE.observe(len(batch))
            metrics.FLUSHED_EVENTS.inc(written.inserted)
            if written.poisoned:
                metrics.POISON_EVENTS.inc(written.poisoned)
            if written.ref_conflicts:
                metrics.LEDGER_REF_CONFLICTS.inc(len(written.ref_conflicts))
            if written.ref_reuses:
                metrics.LEDGER_REF_REUSES.inc(written.ref_reuses)
            self.stats.inserted += written.inserted
            self.stats.duplicates += written.duplicates
            self.stats.ref_conflicts += len(written.ref_conflicts)
            self.stats.ref_reuses += written.ref_reuses
            self.stats.poisoned += written.poisoned
            self.stats.batches += 1

    async def step(self) -> int:
        """One iteration; returns how many entries it handled."""
        if not self._schema_ready:  # events wait in the streams until the schema is there
            async with self.engine.db.connection() as conn:
                behind = await schema_behind(conn)
            if behind:
                raise PostgresUnavailable(behind)
            self._schema_ready = True
        if not self._groups_ready:
            await self.consumer.ensure_groups()
            self._groups_ready = True
        if self._retry:  # a batch that failed: the same entries, before anything new
            retry, self._retry = self._retry, []
            await self.flush(retry)
        now = time.monotonic()
        entries: list[Entry] = []
        if now >= self._next_claim:
            self._next_claim = now + self.claim_every
            entries = await self.consumer.claim()
        if not entries:
            entries = await self.consumer.read()
        if entries:
            await self.flush(entries)
        if time.monotonic() >= self._next_chores:
            self._next_chores = time.monotonic() + 1.0
            await self.chores()
        return len(entries)

    async def chores(self) -> None:
        """Publish lag; apply write-through changes left pending; now and then, finish
        catalog copies a Redis error cut short; hourly, the ledger's partitions (created
        ahead, pruned past the retention); the nightly report when it is due."""
        now_ms = time.time_ns() // 1_000_000
        for lag, (entries, seconds) in zip(await self.consumer.lag(), self._lag_gauges,
                                           strict=True):
            entries.set(lag.entries)
            seconds.set(max(0.0, (now_ms - lag.oldest_ms) / 1000) if lag.oldest_ms else 0)
        await self.apply_pending_outbox()
        if time.monotonic() >= self._next_holds:
            self._next_holds = time.monotonic() + self.settings.hold_sweep_seconds
            await self.expire_holds()
        if time.monotonic() >= self._next_resync:
            self._next_resync = time.monotonic() + CATALOG_RESYNC_SECONDS
            await self.resync_catalog()
        if time.monotonic() >= self._next_ledger and (
                self._ledger_task is None or self._ledger_task.done()):
            # In the background: a month's rollup may take long, the flush goes on.
            self._next_ledger = time.monotonic() + LEDGER_MAINTENANCE_SECONDS
            self._ledger_task = asyncio.create_task(self.maintain_ledger())
        if self.report_time is not None:
            await self.scheduled_report()

    async def expire_holds(self) -> int:
        """Expire the due holds of users no request touches, each with its ledger event;
        first load the users PostgreSQL says hold overdue holds (their state fell out of
        Redis before the holds expired there). Returns how many expired; a failure is
        logged and tried again on the next round."""
        engine = self.engine
        try:
            overdue = await engine.db.fetch("overdue_hold_users", OVERDUE_HOLD_GRACE,
                                            OVERDUE_HOLD_USERS)
            windows = engine.rt.windows()
            for row in overdue:
                await engine.loader.load_user(row["user_id"], windows)
            expired = await engine.holds.sweep()
            metrics.OPEN_HOLDS.set(await engine.db.fetchval("open_holds_count"))
        except (DependencyUnavailable, asyncpg.PostgresError) as exc:
            log.warning("hold expiry failed, retrying: %r", exc)
            return 0
        return expired

    async def maintain_ledger(self) -> bool:
        """Create the ledger's partitions ahead; past LEDGER_RETENTION_DAYS, roll up and
        drop the old ones. A failure is logged and tried again later: the flush goes on."""
        s = self.settings
        now = datetime.fromtimestamp(self.engine.clock.now_ms() / 1000, tz=UTC)
        try:
            created = await ledger.ensure_partitions(self.engine.db, now,
                                                     s.ledger_partitions_ahead)
            if created:
                log.info("ledger: %d monthly partitions created ahead", created)
            if s.ledger_retention_days:
                dropped = await ledger.prune(self.engine.db, now, s.ledger_retention_days,
                                             s.timezone)
                if dropped:
                    log.info("ledger: rolled up and dropped %s", ", ".join(dropped))
        except (DependencyUnavailable, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("ledger maintenance failed, retrying in %.0fs: %r",
                        LEDGER_RETRY_SECONDS, exc)
            self._next_ledger = time.monotonic() + LEDGER_RETRY_SECONDS
            return False
        return True

    async def resync_catalog(self) -> int:
        """Refresh shard catalog copies behind PostgreSQL's; how many were."""
        try:
            resynced = await self.engine.loader.resync_catalog()
        except DependencyUnavailable as exc:  # e.g. while the hot path refuses an older
            log.info("plan catalog check skipped: %s", exc.message)  # Redis: flush first
            return 0
        if resynced:
            log.warning("plan catalog: %d shard copies were behind PostgreSQL, refreshed",
                        resynced)
        return resynced

    async def scheduled_report(self) -> bool:
        """After REPORT_AT (local time), yesterday's report once, by one reconciler only."""
        from pathlib import Path

        from reconciler.report import previous_day, run

        zone = self.engine.calendar.zone
        now = datetime.fromtimestamp(self.engine.clock.now_ms() / 1000, tz=zone)
        if self.report_time is None or (now.hour, now.minute) < self.report_time:
            return False
        day = previous_day(self.engine)
        async with self.engine.db.connection() as conn:
            if await conn.fetchval(QUERIES["report_exists"], day):
                return False
            if not await conn.fetchval(QUERIES["try_report_lock"]):
                return False  # another reconciler is writing it
            try:
                if await conn.fetchval(QUERIES["report_exists"], day):
                    return False
                report = await run(self.engine, self.redis, day, Path(self.settings.report_dir))
                log.info("nightly report for %s: %d drifting counters", day, report.drift_count)
            finally:
                await conn.fetchval(QUERIES["report_unlock"])
        return True

    async def apply_pending_outbox(self) -> int:
        """Apply committed plan, credit and refund changes that never reached Redis."""
        metrics.PENDING_APPLIES.set(await self.engine.db.fetchval("pending_outbox_count"))
        rows = await self.engine.db.fetch("pending_outbox", self.outbox_min_age, OUTBOX_BATCH)
        for row in rows:
            await self.engine.outbox.apply(row["id"], row["user_id"], row["op"],
                                           row["payload"], quiet=False)
        self.stats.outbox_applied += len(rows)
        if rows:
            log.info("applied %d write-through changes left pending", len(rows))
        return len(rows)

    async def drain(self, *, idle_rounds: int = 2) -> None:
        """Flush until the streams are empty (tests, shutdown)."""
        self._next_claim = 0.0
        quiet = 0
        while quiet < idle_rounds:
            quiet = quiet + 1 if await self.step() == 0 else 0
        if self._ledger_task is not None:  # the ledger's maintenance started meanwhile
            await self._ledger_task

    async def run(self, stop: asyncio.Event) -> None:
        """Loop until ``stop`` is set, backing off while a dependency is down."""
        backoff = 0.1
        while not stop.is_set():
            try:
                handled = await self.step()
                backoff = 0.1
                if 0 < handled < self.settings.flush_batch_max // 4:
                    # A small batch: let the streams fill a little, so that each read,
                    # transaction and ack carries more entries (fewer per debit).
                    await asyncio.sleep(self.settings.flush_linger_ms / 1000)
            except DependencyUnavailable as exc:
                log.warning("%s unavailable, retrying in %.1fs: %s", exc.dependency, backoff,
                            exc.message)
            except REDIS_DOWN as exc:
                log.warning("Redis unavailable, retrying in %.1fs: %r", backoff, exc)
                self._groups_ready = False
            except Exception:  # a dead reconciler would let the backlog fill: log, retry
                log.exception("unexpected reconciler error, retrying in %.1fs", backoff)
                self._groups_ready = False
            else:
                continue
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
        if self._ledger_task is not None and not self._ledger_task.done():
            self._ledger_task.cancel()  # a rollup cut short is rolled back, done next time
            with contextlib.suppress(asyncio.CancelledError):
                await self._ledger_task


async def serve_forever(engine: Engine, redis: aioredis.Redis) -> None:
    """Run until SIGTERM or SIGINT, finishing the batch in hand."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reconciler = Reconciler(engine, redis)
    log.info("reconciler %s started on %d shards", reconciler.consumer.name,
             engine.settings.n_shards)
    await reconciler.run(stop)
    log.info("reconciler stopped: %s", reconciler.stats)

