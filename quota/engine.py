"""The quota engine: one script call per debit or check, loading from PostgreSQL when told.

The decision logic lives in the Lua scripts (atomic in Redis); the engine builds their
keys and arguments and reacts to "not loaded" and "stale window" answers. Its parts:
``Loader`` (users and the catalog from PostgreSQL), ``Outbox`` (write-through changes to
Redis), ``Plans`` (assignments and catalog changes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from core import metrics, refs
from core.clock import Clock, SystemClock, new_tx_id
from core.errors import DependencyUnavailable, invariant
from core.events import debit_event_head
from core.settings import Settings
from lua.cluster import ClusterRedis, HotRedis, hot_path_client
from lua.connection import WaitPolicy
from lua.instance import InstanceGuard
from lua.keys import Keys
from lua.periods import Calendar, Windows
from lua.replies import CheckReply, DebitReply, Status
from lua.scripts import DebitLimits, Scripts
from persistence.db import Database
from persistence.migrate import schema_behind
from persistence.queries import QUERIES
from quota.backlog import Backlog, backlog_total, per_shard
from quota.holds import Holds
from quota.loading import Loader
from quota.outbox import Outbox
from quota.plans import Plans
from quota.runtime import Runtime

#: The user id /ready checks: it proves a script runs by EVALSHA end to end.
READY_PROBE_USER = "~ready-probe"
_RETRYABLE = (Status.NOT_LOADED, Status.STALE_WINDOW)


class Engine:
    """Runs the quota scripts for one process; stateless apart from small caches."""

    def __init__(
        self,
        settings: Settings,
        redis: HotRedis,
        db: Database,
        clock: Clock,
        new_id: Callable[[int | None], str] = new_tx_id,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.db = db
        self.clock = clock
        self.new_id = new_id
        self.keys = Keys(settings.key_prefix, settings.n_shards)
        self.calendar = Calendar(settings.timezone)
        self.action_meters = dict(settings.action_meters)
        #: The meters a full check answers besides the plan's: the seed's two, the balance
        #: meter and the actions' (a meter holding credits outside the plan shows them).
        self.check_meters: tuple[str, ...] = tuple(sorted(
            {"chat", "template", settings.balance_meter, *self.action_meters.values()}))
        self.rt = Runtime(settings, redis, db, clock, new_id, self.keys, Scripts(redis),
                          self.calendar)
        self.loader = Loader(self.rt)
        self.outbox = Outbox(self.rt, self.loader)
        self.plans = Plans(self.rt, self.loader, self.outbox)
        self.holds = Holds(self.rt, self.loader, self._debit_limits)
        # Each new Redis connection first proves that Redis is not older than it was.
        self.guard = InstanceGuard(settings.redis_url, self.keys)
        if isinstance(redis, ClusterRedis):  # per node: only a node's own shards
            redis.on_node_connect = self.guard.check_node
            self.guard.cluster = redis
        else:
            redis.on_connect = self.guard.check
        self._limits = self._debit_limits()
        self._header: tuple[Windows, int, tuple[str | int, ...]] | None = None

    def backlog_total(self) -> int:
        """Unflushed ledger entries all shards may hold (sized to Redis's maxmemory)."""
        return backlog_total(self.settings.max_backlog_entries, self.guard.maxmemory)

    def _debit_limits(self) -> DebitLimits:
        s = self.settings
        return DebitLimits(
            idempotency_ttl_ms=s.idempotency_ttl_seconds * 1000,
            grace_ms=s.counter_grace_seconds * 1000,
            state_ttl_ms=s.user_state_ttl_seconds * 1000,
            backlog_limit=per_shard(self.backlog_total(), s.n_shards),
            default_plan=s.default_plan)

    async def close(self) -> None:
        """Release Redis and PostgreSQL (and stop a rebuild this process runs)."""
        await self.guard.close()
        await self.redis.close()
        await self.db.close()

    def debit_header(self, windows: Windows) -> tuple[str | int, ...]:
        """The arguments every debit of a debit_many call shares (cached per windows)."""
        now = self.clock.script_now()
        cached = self._header
        if cached is not None and cached[0] is windows and cached[1] == now:
            return cached[2]
        self._limits = self._debit_limits()  # Redis's maxmemory may have been learnt since
        header = Scripts.debit_header(now=now, windows=windows, limits=self._limits)
        self._header = (windows, now, header)
        return header

    async def debit(
        self, user_id: str, meter: str, amount: int, ref: str, *,
        reason: str = "", caller: str = "", action: str = "",
    ) -> DebitReply:
        """Debit ``amount`` micro-units of ``meter`` once per (user, ref).

        The call goes out as one item of a debit_many batch with the other debits this
        worker issues meanwhile (lua/connection.py).
        """
        invariant(amount > 0, "debit amounts are positive")
        windows = self.rt.windows()
        h = refs.ref_hash(user_id, ref)
        tx_id, record_id = refs.debit_tx(h)
        ref_record = h[:refs.FIELD_BYTES] + refs.fingerprint(meter, amount, reason) + record_id
        event_head = debit_event_head(tx_id, user_id, meter, amount, ref, reason, caller, action)
        scripts = self.rt.scripts
        for _ in range(self.settings.load_retries + 2):
            raw = await scripts.debit(
                self.keys.debit_keys(user_id, meter, windows),
                header=self.debit_header(windows), meter=meter, amount=amount,
                ref_record=ref_record, event_head=event_head)
            reply = DebitReply.decode(raw, tx_id, amount)
            if reply.status is Status.DUPLICATE:  # the first debit's tx, from its record
                reply.tx_id = refs.tx_of(h, refs.reply_bytes(reply.tx_id))
            if reply.status is Status.STALE_WINDOW:
                windows = self.calendar.windows(reply.now_ms)
            elif reply.status is Status.NOT_LOADED:
                await self.loader.load(reply.detail, user_id, windows)
            else:
                return reply
        raise DependencyUnavailable("redis", f"user state of {user_id!r} could not be loaded")

    async def check(self, user_id: str, meters: Sequence[str] | None = None) -> CheckReply:
        """Remaining amounts of ``meters``; by default of ``check_meters`` and every other
        meter of the user's plan (the same meters whichever worker answers)."""
        keys = self.keys
        windows = self.rt.windows()
        every = meters is None
        asked = self.check_meters if meters is None else meters
        for _ in range(self.settings.load_retries + 2):
            reply = await self.rt.scripts.check(
                keys.user(user_id), keys.plans(keys.shard(user_id)),
                header=Scripts.check_header(now=self.clock.script_now(), windows=windows,
                                            default_plan=self.settings.default_plan),
                every=every, meters=asked)
            if reply.status not in _RETRYABLE:
                return reply
            if reply.status is Status.STALE_WINDOW:
                windows = self.calendar.windows(reply.now_ms)
            else:
                await self.loader.load(reply.detail, user_id, windows)
        raise DependencyUnavailable("redis", f"user state of {user_id!r} could not be loaded")

    async def ready(self) -> dict[str, str]:
        """Prove the real path: a script by EVALSHA in Redis and a query in PostgreSQL."""
        status = {"redis": "ok", "postgres": "ok"}
        try:
            await self.check(READY_PROBE_USER, [self.settings.balance_meter])
        except DependencyUnavailable as exc:
            # A probe user is "not loaded"; loading it needs PostgreSQL, so tell them apart.
            status["redis" if exc.dependency == "redis" else "postgres"] = exc.message
        try:
            async with self.db.connection() as conn:
                await conn.fetchval(QUERIES["ping"])
                behind = await schema_behind(conn)
            if behind:
                status["postgres"] = behind
        except DependencyUnavailable as exc:
            status["postgres"] = exc.message
        if isinstance(self.redis, ClusterRedis):  # every primary, by its address
            try:
                nodes = await self.redis.node_status()
            except DependencyUnavailable as exc:
                nodes = {}
                if status["redis"] == "ok":
                    status["redis"] = exc.message
            failing = [(a, v) for a, v in nodes.items() if v != "ok"]
            for address, verdict in nodes.items():
                status[f"redis@{address}"] = verdict
            if failing:  # the node, rather than what the probe met there
                address, verdict = failing[0]
                status["redis"] = f"unavailable: node {address}: " \
                    f"{verdict.removeprefix('unavailable: ')}"
        if status["redis"] == "ok":
            backlog = await self.backlog()
            status["ledger"] = backlog.verdict(self.settings.flush_lag_alert_seconds)
        return status

    async def backlog(self) -> Backlog:
        """The unflushed ledger: entries, its limit, the oldest entry's age, full shards;
        published as gauges (the reconciler's own may be gone with it)."""
        n = self.settings.n_shards
        limit = per_shard(self.backlog_total(), n)
        lags = await self.rt.scripts.ledger_lag(self.keys.all_ledgers())
        now_ms = self.clock.now_ms()
        oldest = max((now_ms - first for _, first in lags if first), default=0)
        backlog = Backlog(sum(entries for entries, _ in lags), limit * n,
                          max(0.0, oldest / 1000),
                          sum(1 for entries, _ in lags if entries >= limit))
        metrics.LEDGER_BACKLOG.set(backlog.entries)
        metrics.LEDGER_BACKLOG_LIMIT.set(backlog.limit)
        metrics.LEDGER_OLDEST_SECONDS.set(backlog.oldest_seconds)
        return backlog


def wait_policy(settings: Settings) -> WaitPolicy | None:
    """The WAIT for replicas after writes that the settings ask for (REDIS_WAIT_*)."""
    if not settings.redis_wait_replicas:
        return None
    return WaitPolicy(settings.redis_wait_replicas, settings.redis_wait_timeout_ms,
                      settings.redis_wait_debits)


def make_engine(settings: Settings, clock: Clock | None = None) -> Engine:
    """An engine connected (lazily) to the configured Redis and PostgreSQL."""
    if not settings.redis_url or not settings.db_dsn:
        raise RuntimeError("REDIS_URL and DB_DSN must be set (`quota-gateway serve` sets them)")
    redis = hot_path_client(
        settings.redis_url, timeout_seconds=settings.redis_timeout_seconds,
        connect_timeout_seconds=settings.redis_connect_timeout_seconds,
        connections=settings.redis_connections, wait=wait_policy(settings),
    )
    db = Database(settings.db_dsn, min_size=settings.db_pool_min,
                  max_size=settings.db_pool_max, timeout=settings.db_timeout_seconds)
    return Engine(settings, redis, db, clock or SystemClock())
