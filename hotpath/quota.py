"""The quota engine: one script call per operation, loading from PostgreSQL when told to.

The decision logic lives in the Lua scripts (atomic in Redis); this module builds their
keys and arguments, reacts to "not loaded" and "stale window" answers, and writes
plan assignments through PostgreSQL first.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hotpath import metrics
from hotpath.clock import Clock, new_tx_id
from hotpath.errors import DependencyUnavailable, InvariantBroken, NotFound, invariant
from hotpath.instance import InstanceGuard
from hotpath.settings import Settings
from lua import SCRIPTS, CheckReply, DebitReply, Keys, Script, Status
from lua.connection import PipelinedRedis, RedisReplyError
from lua.periods import Calendar, Windows
from persistence.db import Database
from persistence.migrate import schema_behind
from persistence.plans import Plan, catalog_fields, list_plans, put_plan
from persistence.queries import QUERIES
from reconciler.events import LedgerEvent, columns, debit_event_head

log = logging.getLogger("quota_gateway.engine")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: How far this process's clock may run ahead of Redis's without an idempotency key being
#: left out when a user's keys are restored from the ledger (``_restore_refs``).
RESTORE_CLOCK_MARGIN_MS = 3_600_000
#: The user id /ready checks: it proves a script runs by EVALSHA end to end.
READY_PROBE_USER = "~ready-probe"
_RETRYABLE = (Status.NOT_LOADED, Status.STALE_WINDOW, Status.NEED_METERS)
_DEBIT_MANY = SCRIPTS["debit_many"]
#: Ledger rows read, and idempotency keys restored, per page (one restore_refs call each).
_RESTORE_PAGE = 500


def to_ms(moment: datetime) -> int:
    """An aware datetime as exact epoch milliseconds."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return EPOCH + timedelta(milliseconds=ms)


def fingerprint(meter: str, amount: int, reason: str) -> str:
    """What makes two debits with one ref "the same request"."""
    digest = hashlib.blake2b(reason.encode(), digest_size=8).hexdigest() if reason else ""
    return f"{meter}:{amount}:{digest}"


def debit_args(user_id: str, meter: str, amount: int, ref: str, reason: str, caller: str,
               action: str, tx_id: str) -> tuple[str | int, str | int, str, str]:
    """One debit's arguments in a debit_many.lua call (they follow the call's header):
    meter, amount, the idempotency record's head, the ledger event's head."""
    return (meter, amount, f"{fingerprint(meter, amount, reason)}\n{tx_id}",
            debit_event_head(tx_id, user_id, meter, amount, ref, reason, caller, action))


@dataclass(frozen=True, slots=True)
class PlanAssignment:
    """The result of applying a plan to a user."""

    user_id: str
    plan_code: str
    expires_ms: int
    version: int
    tx_id: str
    applied_in_redis: bool


class Engine:
    """Runs the quota scripts for one process; stateless apart from small caches."""

    def __init__(
        self,
        settings: Settings,
        redis: PipelinedRedis,
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
        # Meters a full check asks for; grows when a plan names more (NEED_METERS).
        self.known_meters: tuple[str, ...] = tuple(
            sorted({"chat", "template", settings.balance_meter, *self.action_meters.values()})
        )
        s = settings
        self._debit_tail = (
            s.idempotency_ttl_seconds * 1000, s.counter_grace_seconds * 1000,
            s.user_state_ttl_seconds * 1000, s.max_backlog_entries, s.default_plan,
        )
        self._header: tuple[Windows, int, tuple[str | int, ...]] | None = None
        self._loading: dict[str, asyncio.Task[None]] = {}  # user loads in flight
        # Each new Redis connection first proves that Redis is not older than it was.
        self.guard = InstanceGuard(settings.redis_url, self.keys)
        redis.on_connect = self.guard.check

    async def close(self) -> None:
        """Release Redis and PostgreSQL (and stop a rebuild this process runs)."""
        await self.guard.close()
        await self.redis.close()
        await self.db.close()

    # -- script calls ----------------------------------------------------------------------
    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self.redis.run_script(script, keys, args)
        except RedisReplyError as exc:
            raise self._script_error(script, exc) from None

    @staticmethod
    def _script_error(script: Script, exc: RedisReplyError) -> Exception:
        message = str(exc)
        if "qg:" in message:  # a script's own argument check: our bug, not the caller's
            return InvariantBroken(f"{script.name}: {message}")
        return DependencyUnavailable("redis", f"Redis refused {script.name}: {message}")

    def _windows(self) -> Windows:
        return self.calendar.windows(self.clock.now_ms())

    def debit_header(self, windows: Windows) -> tuple[str | int, ...]:
        """The arguments every debit of a debit_many call shares (cached per windows)."""
        now = self.clock.script_now()
        cached = self._header
        if cached is not None and cached[0] is windows and cached[1] == now:
            return cached[2]
        header = (now, windows.day_id, windows.day_start_ms, windows.day_end_ms,
                  windows.month_id, windows.month_end_ms, *self._debit_tail)
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
        windows = self._windows()
        tx_id = self.new_id(None)
        args = debit_args(user_id, meter, amount, ref, reason, caller, action, tx_id)
        script = _DEBIT_MANY
        for _ in range(self.settings.load_retries + 2):
            try:
                raw = await self.redis.run_batched(
                    script, self.debit_header(windows),
                    self.keys.debit_keys(user_id, ref, meter, windows), args)
            except RedisReplyError as exc:
                raise self._script_error(script, exc) from None
            reply = DebitReply.decode(raw, tx_id, amount)
            if reply.status is Status.STALE_WINDOW:
                windows = self.calendar.windows(reply.now_ms)
            elif reply.status is Status.NOT_LOADED:
                await self._load(reply.detail, user_id, windows)
            else:
                return reply
        raise DependencyUnavailable("redis", f"user state of {user_id!r} could not be loaded")

    async def check(self, user_id: str, meters: Sequence[str] | None = None) -> CheckReply:
        """Remaining amounts of ``meters`` (or of every meter of the user's plan)."""
        keys = self.keys
        shard = keys.shard(user_id)
        windows = self._windows()
        every = meters is None
        asked = list(self.known_meters if meters is None else meters)
        for _ in range(self.settings.load_retries + 3):
            counter_keys = [k for m in asked for k in keys.counters(user_id, m, windows)]
            reply = CheckReply.decode(await self._run(
                SCRIPTS["check"],
                (keys.user(user_id), keys.plans(shard), *counter_keys),
                (self.clock.script_now(), windows.day_start_ms, windows.day_end_ms,
                 windows.month_start_ms, windows.month_end_ms, self.settings.default_plan,
                 "1" if every else "0", *asked),
            ))
            if reply.status not in _RETRYABLE:
                return reply
            if reply.status is Status.STALE_WINDOW:
                windows = self.calendar.windows(reply.now_ms)
            elif reply.status is Status.NEED_METERS:
                wanted = set(reply.detail.split(",")) | set(asked)
                self.known_meters = tuple(sorted(wanted | set(self.known_meters)))
                asked = sorted(wanted)
            else:
                await self._load(reply.detail, user_id, windows)
        raise DependencyUnavailable("redis", f"user state of {user_id!r} could not be loaded")

    # -- loading from PostgreSQL -----------------------------------------------------------
    async def _load(self, what: str, user_id: str, windows: Windows) -> None:
        if what == "catalog":
            await self.sync_catalog([self.keys.shard(user_id)])
        else:
            await self.load_user(user_id, windows)

    async def sync_catalog(self, shards: Sequence[int] | None = None) -> int:
        """Copy the plan catalog from PostgreSQL into the given shards (default: all)."""
        plans = await list_plans(self.db)
        if not any(p.plan_code == self.settings.default_plan for p in plans):
            raise InvariantBroken(
                f"the default plan {self.settings.default_plan!r} is not in the catalog: "
                "run `quota-gateway migrate`"
            )
        self.known_meters = tuple(
            sorted(set(self.known_meters) | {m for p in plans for m in p.meters})
        )
        version = max(p.version for p in plans)
        fields = catalog_fields(plans)
        targets = range(self.settings.n_shards) if shards is None else shards
        results = await asyncio.gather(*(
            self._run(SCRIPTS["load_catalog"], (self.keys.plans(s),), (version, *fields))
            for s in targets
        ))
        return sum(results)

    async def load_user(self, user_id: str, windows: Windows) -> None:
        """Write the user's PostgreSQL state into Redis where Redis lacks it: first the
        idempotency keys of recent debits, then the state (which marks the user loaded).

        Concurrent loads of one user in this process share one: after Redis lost its data,
        every request of a busy user answers "not loaded" at once, and each would otherwise
        read the same rows from PostgreSQL.
        """
        task = self._loading.get(user_id)
        if task is None:
            task = asyncio.ensure_future(self._load_user(user_id, windows))
            self._loading[user_id] = task
            task.add_done_callback(functools.partial(self._load_done, user_id))
        await asyncio.shield(task)  # a caller that goes away leaves the load running

    def _load_done(self, user_id: str, task: asyncio.Task[None]) -> None:
        self._loading.pop(user_id, None)
        if not task.cancelled():
            task.exception()  # seen here too, in case every caller went away

    async def _load_user(self, user_id: str, windows: Windows) -> None:
        keys = self.keys
        user_key = keys.user(user_id)
        if await self.redis.execute("HEXISTS", user_key, "loaded"):
            return  # another process loaded it meanwhile
        grace_ms = self.settings.counter_grace_seconds * 1000
        await self._restore_refs(user_id)
        for _ in range(self.settings.load_retries):
            generation = await self.redis.execute("HGET", user_key, "wg") or "0"
            periods = [windows.period_id("d"), windows.period_id("m"), "n"]
            # One snapshot: the credit balances and the payment changes they already hold.
            async with self.db.snapshot() as conn:
                plan = await conn.fetchrow(QUERIES["get_user_plan"], user_id)
                credits = await conn.fetch(QUERIES["user_credits"], user_id)
                included = await conn.fetch(QUERIES["user_pending_payments"], user_id)
                usage = await conn.fetch(QUERIES["user_usage"], user_id, periods)
            counter_keys: list[str] = []
            counter_args: list[int] = []
            lifetime: list[str | int] = []
            for row in usage:
                kind, _, period = row["period_id"].partition(":")
                if kind == "n":
                    lifetime += [row["meter"], row["used_micro"]]
                    continue
                kind_window = "d" if kind == "d" else "m"
                counter_keys.append(keys.counter(user_id, row["meter"], kind, period))
                counter_args += [row["used_micro"], windows.period_end_ms(kind_window) + grace_ms]
            credit_args: list[str | int] = [
                v for r in credits for v in (r["meter"], max(0, r["balance_micro"]))
            ]
            code = plan["plan_code"] if plan else self.settings.default_plan
            expires = to_ms(plan["expires_at"]) if plan and plan["expires_at"] else 0
            version = plan["version"] if plan else 0
            reply = await self._run(
                SCRIPTS["load_user"], (user_key, *counter_keys),
                (generation, code, expires, version, self.settings.user_state_ttl_seconds * 1000,
                 self.clock.script_now(), len(credits), *credit_args, len(lifetime) // 2, *lifetime,
                 len(included), *(r["id"] for r in included), *counter_args),
            )
            if reply[0] == 1:
                metrics.USER_LOADS.inc()
            if reply[0] != -1:
                return
        raise DependencyUnavailable("redis", f"user {user_id!r} kept changing while loading")

    async def _restore_refs(self, user_id: str) -> int:
        """Put back the idempotency keys of the user's flushed debits still within their TTL
        (Redis may have lost them with the user's state), so that a retry of one answers
        DUPLICATE with its tx id and remaining instead of debiting again. Keys that exist
        are kept. The ledger is read a page at a time, each page restored by one short
        script call, so a user with many refs costs neither memory nor a long Redis call.
        Returns the number of keys written.

        The script judges each key's life on the clock that stamped the debits (Redis
        TIME); the ledger is read from ``RESTORE_CLOCK_MARGIN_MS`` earlier than this process's
        clock says the window starts, so that a clock running ahead loses no key."""
        ttl_ms = self.settings.idempotency_ttl_seconds * 1000
        start = self.clock.now_ms() - ttl_ms - RESTORE_CLOCK_MARGIN_MS
        after: tuple[datetime, uuid.UUID] = (from_ms(start), uuid.UUID(int=0))
        written = 0
        while True:
            rows = await self.db.fetch("user_recent_debits", user_id, *after, _RESTORE_PAGE)
            keys: list[str] = []
            args: list[str | int] = [self.clock.script_now()]
            for row in rows:
                # A debit flushed before migration 0004 has no remaining recorded: 0.
                value = (f"{fingerprint(row['meter'], -row['amount_micro'], row['reason'] or '')}"
                         f"\n{row['tx_id']}\n{row['remaining_micro'] or 0}")
                keys.append(self.keys.idempotency(user_id, row["ref"]))
                args += [value, to_ms(row["occurred_at"]) + ttl_ms]
            if keys:
                written += (await self._run(SCRIPTS["restore_refs"], keys, args))[1]
            if len(rows) < _RESTORE_PAGE:
                break
            after = (rows[-1]["occurred_at"], rows[-1]["tx_id"])
        if written:
            metrics.REFS_RESTORED.inc(written)
        return written

    # -- plans -----------------------------------------------------------------------------
    async def apply_plan(
        self, user_id: str, plan_code: str, expires_ms: int | None, caller: str
    ) -> PlanAssignment:
        """Assign a plan: committed in PostgreSQL (with its ledger event), then in Redis."""
        now_ms = self.clock.now_ms()
        tx_id = self.new_id(now_ms)
        async with self.db.transaction() as conn:
            plan = await conn.fetchrow(QUERIES["get_plan_row"], plan_code)
            if plan is None:
                raise NotFound(f"unknown plan {plan_code!r}", field="plan_code")
            if expires_ms is None and plan["duration_days"]:
                expires_ms = now_ms + plan["duration_days"] * 86_400_000
            expires_at = from_ms(expires_ms) if expires_ms else None
            row = await conn.fetchrow(QUERIES["set_user_plan"], user_id, plan_code, expires_at)
            assert row is not None
            await conn.execute(QUERIES["insert_plan_event"], tx_id, user_id, plan_code, caller,
                               None, from_ms(now_ms))
            payload = {"plan_code": plan_code, "expires_ms": expires_ms or 0,
                       "version": row["version"]}
            outbox_id = await conn.fetchval(QUERIES["insert_outbox"], user_id, "plan", payload)
        applied = await self.apply_outbox(outbox_id, user_id, "plan", payload, quiet=True)
        return PlanAssignment(user_id, plan_code, expires_ms or 0, row["version"], tx_id, applied)

    async def apply_outbox(
        self, outbox_id: int, user_id: str, op: str, payload: dict[str, Any], *, quiet: bool
    ) -> bool:
        """Apply one committed write-through change to Redis and mark it applied.

        With ``quiet``, a Redis or PostgreSQL failure returns False: the change is durable
        in PostgreSQL and the reconciler applies it later.
        """
        try:
            if op == "plan":
                await self._run(
                    SCRIPTS["set_plan"], (self.keys.user(user_id),),
                    (payload["plan_code"], payload["expires_ms"], payload["version"],
                     self.settings.user_state_ttl_seconds * 1000),
                )
            elif op in ("credit", "refund"):
                now_ms = self.clock.now_ms()
                result, plan_code = await self.apply_payment(outbox_id, user_id, op, payload,
                                                             now_ms)
                if op == "refund":
                    await self._record_refund(outbox_id, user_id, payload, result, plan_code,
                                              now_ms)
                    return True
            else:
                raise InvariantBroken(f"unknown outbox operation {op!r}")
            async with self.db.connection() as conn:
                await conn.execute(QUERIES["mark_outbox_applied"], outbox_id)
        except DependencyUnavailable:
            if not quiet:
                raise
            return False
        return True

    async def _record_refund(self, outbox_id: int, user_id: str, payload: dict[str, Any],
                             taken: dict[str, int], plan_code: str, now_ms: int) -> None:
        """Write what a refund took back in Redis through to PostgreSQL, in one transaction:
        the refund's ``taken``, its ledger events and the outbox row's "applied" mark.

        The shard stream carries the same events (the same tx ids), which the flush then
        inserts no second time (both copies carry the same time and plan code). Written here,
        they do not depend on the stream: were Redis to lose it before the flush, the next
        load would otherwise give the refunded credits back (PostgreSQL's balance would not
        hold the refund, and the outbox row, already marked applied, would not be applied
        again).
        """
        now = from_ms(now_ms)
        shard = self.keys.shard(user_id)
        events = [
            LedgerEvent(
                tx_id=uuid.UUID(tx), kind="refund", user_id=user_id, meter=meter,
                amount=-taken.get(meter, 0), from_allowance=0, from_credits=taken.get(meter, 0),
                period_id="n", ref=payload["refund_id"], reason=f"wanted={wanted}",
                caller=payload.get("caller", ""), action=None, plan_code=plan_code or None,
                occurred_at=now, shard=shard, stream_id=None,
            )
            for meter, wanted, tx in payload["credits"]
        ]
        async with self.db.transaction() as conn:
            await conn.execute(QUERIES["set_refund_taken"], payload["refund_id"], taken)
            if events:
                await conn.fetchval(QUERIES["flush_events"], *columns(events))
            await conn.execute(QUERIES["mark_outbox_applied"], outbox_id)

    async def apply_payment(
        self, outbox_id: int, user_id: str, op: str, payload: dict[str, Any], now_ms: int
    ) -> tuple[dict[str, int], str]:
        """Run apply_payment.lua for a committed credit or refund: what it added or took,
        and the user's plan code in Redis. ``now_ms`` stamps a refund's ledger events.

        A refund needs the user's state in Redis (it takes back only what is left), so a
        "not loaded" answer loads the user and retries. A change applied before whose
        result Redis no longer knows (the user was reloaded) is read back from the ledger.
        """
        plan = payload.get("plan") or {}
        triples = [v for meter, amount, tx in payload["credits"] for v in (meter, amount, tx)]
        args = (op, outbox_id, plan.get("plan_code", ""), plan.get("expires_ms", 0),
                plan.get("version", 0), self.settings.user_state_ttl_seconds * 1000,
                now_ms, payload.get("caller", ""),
                payload.get("refund_id") or payload["order_id"], user_id,
                len(payload["credits"]), *triples)
        keys = (self.keys.user(user_id), self.keys.ledger(self.keys.shard(user_id)))
        for _ in range(self.settings.load_retries + 1):
            reply = await self._run(SCRIPTS["apply_payment"], keys, args)
            status, text = reply[0], reply[1]
            if Status(status) is not Status.NOT_LOADED:
                plan_code = reply[2]
                break
            await self.load_user(user_id, self._windows())
        else:
            raise DependencyUnavailable("redis", f"user {user_id!r} could not be loaded")
        if Status(status) is Status.OK:
            for meter, _, _ in payload["credits"]:
                (metrics.CREDITS if op == "credit" else metrics.REFUNDS).labels(meter).inc()
        if text in ("loaded", "deferred"):
            if op == "credit":
                return {meter: amount for meter, amount, _ in payload["credits"]}, plan_code
            rows = await self.db.fetch("refund_events", payload["refund_id"])
            return {r["meter"]: r["from_credits_micro"] for r in rows}, plan_code
        pairs = (item.partition("=") for item in text.split(",") if item)
        return {meter: int(amount) for meter, _, amount in pairs}, plan_code

    async def put_plan_and_sync(self, plan: Plan, caller: str, *,
                                from_version: int | None = None) -> Plan:
        """Write a plan to PostgreSQL as ``caller`` (see ``put_plan``), then push the new
        catalog to every shard.

        Redis is asked first: when it is down the PUT answers 503 and nothing is committed.
        Once the plan is committed the PUT succeeds, even if the copy to the shards is cut
        short (Redis went away in between): the change is durable, and ``resync_catalog``
        (the reconciler's chores) finishes the copy; a 503 then would have the caller's
        retry of its ``version`` refused as a conflict with its own change."""
        await self.redis.execute("PING")
        stored = await put_plan(self.db, plan, caller, from_version=from_version)
        try:
            await self.sync_catalog()
        except DependencyUnavailable as exc:
            log.warning("plan %s version %d committed, but copying the catalog to Redis "
                        "failed (%s): the reconciler's catalog resync finishes it",
                        stored.plan_code, stored.version, exc)
        return stored

    async def resync_catalog(self) -> int:
        """Bring every shard copy that is older than PostgreSQL's catalog up to date;
        returns how many were. A plan change committed in PostgreSQL whose copying to the
        shards failed half-way (Redis went away: the caller got 503) would otherwise
        leave those shards on the old rules for good: only a missing copy is refilled by
        the debits themselves. The reconciler runs this with its chores."""
        version = await self.db.fetchval("catalog_version")
        held = await asyncio.gather(*(self.redis.execute("HGET", self.keys.plans(s), "~v")
                                      for s in range(self.settings.n_shards)))
        stale = [s for s, v in enumerate(held) if v is not None and int(v) < version]
        if stale:
            await self.sync_catalog(stale)
        return len(stale)

    # -- readiness -------------------------------------------------------------------------
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
        return status
