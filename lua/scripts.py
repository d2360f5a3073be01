"""One named wrapper per script: callers pass named arguments, the wrapper lays out KEYS
and ARGV as the script's header says, and maps Redis's errors at this boundary.

A script's own argument check (an error text starting ``qg:``) is our bug, not the
caller's: it raises ``InvariantBroken``. Any other error reply means Redis refused the
call (out of memory, a replica, a busy script): ``DependencyUnavailable``, a 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import DependencyUnavailable, InvariantBroken
from lua.cluster import HotRedis
from lua.periods import Windows
from lua.replies import CheckReply, Status
from lua.resp import RedisReplyError
from lua.source import SCRIPTS, Script

_DEBIT_MANY = SCRIPTS["debit_many"]
_CHECK_MANY = SCRIPTS["check_many"]


def script_error(script: Script, exc: RedisReplyError) -> Exception:
    """The exception a Redis error reply to ``script`` stands for."""
    message = str(exc)
    if "qg:" in message:
        return InvariantBroken(f"{script.name}: {message}")
    return DependencyUnavailable("redis", f"Redis refused {script.name}: {message}")


def parse_ledger_lag(reply: Sequence[Any]) -> list[tuple[int, int]]:
    """ledger_lag.lua's reply, whichever client ran it: per stream, (unflushed entries,
    epoch ms of the oldest or 0)."""
    return [(int(reply[i]), int(str(reply[i + 1]).split("-", 1)[0]))
            for i in range(0, len(reply), 2)]


@dataclass(frozen=True, slots=True)
class DebitLimits:
    """The deployment's constants every debit_many call carries (ARGV[7..11]), and the hold
    scripts (reserve, settle, extend) those of them they need."""

    idempotency_ttl_ms: int
    grace_ms: int
    state_ttl_ms: int
    backlog_limit: int
    default_plan: str


@dataclass(frozen=True, slots=True)
class PaymentReply:
    """apply_payment.lua's answer: its status, what it added or took back (or 'deferred',
    'loaded'), and the user's plan code in Redis."""

    status: Status
    result: str
    plan_code: str


class Scripts:
    """The scripts, run on one Redis client by EVALSHA (NOSCRIPT: the source once).

    The write-through scripts (set_plan, apply_payment) are followed by WAIT for replicas
    when the client has a WaitPolicy (REDIS_WAIT_REPLICAS); debits when REDIS_WAIT_DEBITS."""

    def __init__(self, redis: HotRedis) -> None:
        self.redis = redis

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[str | int | bytes], *,
                   wait: bool = False) -> Any:
        try:
            return await self.redis.run_script(script, keys, args, wait=wait)
        except RedisReplyError as exc:
            raise script_error(script, exc) from None

    # -- debit_many.lua --------------------------------------------------------------------
    @staticmethod
    def debit_header(*, now: int, windows: Windows, limits: DebitLimits) -> tuple[str | int, ...]:
        """ARGV[1..11]: what every debit of one call shares."""
        return (now, windows.day_id, windows.day_start_ms, windows.day_end_ms,
                windows.month_id, windows.month_end_ms, limits.idempotency_ttl_ms,
                limits.grace_ms, limits.state_ttl_ms, limits.backlog_limit, limits.default_plan)

    async def debit(self, keys: Sequence[str], *, header: tuple[str | int, ...], meter: str,
                    amount: int, ref_record: bytes, event_head: str) -> list[Any]:
        """One debit, sent as an item of a batch with the other debits the connection has
        queued under the same header (``PipelinedRedis.run_batched``). ``keys`` are
        ``Keys.debit_keys``; ``ref_record`` the idempotency record's field and head
        (``core.refs``); ``event_head`` the
        ledger event's head (``core.events.debit_event_head``)."""
        try:
            reply: list[Any] = await self.redis.run_batched(
                _DEBIT_MANY, header, keys, (meter, amount, ref_record, event_head))
        except RedisReplyError as exc:
            raise script_error(_DEBIT_MANY, exc) from None
        return reply

    # -- check_many.lua --------------------------------------------------------------------
    @staticmethod
    def check_header(*, now: int, windows: Windows, default_plan: str
                     ) -> tuple[str | int, ...]:
        """ARGV[1..8]: what every check of one call shares."""
        return (now, windows.day_id, windows.day_start_ms, windows.day_end_ms,
                windows.month_id, windows.month_start_ms, windows.month_end_ms, default_plan)

    async def check(self, user_key: str, plans_key: str, *, header: tuple[str | int, ...],
                    every: bool, meters: Sequence[str]) -> CheckReply:
        """The user's plan and what remains of ``meters``, sent as an item of a batch with
        the other checks the connection has queued under the same header. With ``every``,
        the plan's other meters are answered too, after ``meters``."""
        try:
            reply: Any = await self.redis.run_batched(
                _CHECK_MANY, header, (user_key, plans_key),
                ("1" if every else "0", ",".join(meters)))
        except RedisReplyError as exc:
            raise script_error(_CHECK_MANY, exc) from None
        return CheckReply.decode(reply)

    # -- load_user.lua ---------------------------------------------------------------------
    async def load_user(
        self, user_key: str, *, generation: str, plan_code: str, expires_ms: int,
        plan_version: int, plan_start_ms: int, state_ttl_ms: int, now: int,
        credits: Sequence[tuple[str, int]], lifetime: Sequence[tuple[str, int]],
        included_outbox: Sequence[int], counters: Sequence[tuple[str, int, int]],
        holds: Sequence[tuple[str, str, int]] = (), refs_ttl_ms: int = 1,
        records: Sequence[tuple[bytes, int, int]] = (),
    ) -> tuple[int, int]:
        """Write a user's PostgreSQL state where Redis lacks it. ``credits`` and
        ``lifetime`` are (meter, micro-units); ``counters`` (key, used, expire-at ms);
        ``holds`` the open holds (id, record, expires ms); ``records`` idempotency records
        to put back first, as ``restore_refs`` takes them, with their TTL.
        Returns (1 loaded, records written), (0, 0) already loaded, or (-1, 0) changed
        since ``generation`` (read again)."""
        reply = await self._run(
            SCRIPTS["load_user"], (user_key, *(key for key, _, _ in counters)),
            (generation, plan_code, expires_ms, plan_version, state_ttl_ms, now, plan_start_ms,
             len(credits), *(v for pair in credits for v in pair),
             len(lifetime), *(v for pair in lifetime for v in pair),
             len(included_outbox), *included_outbox,
             len(holds), *(v for hold in holds for v in hold),
             refs_ttl_ms, len(records), *(v for rec in records for v in rec),
             *(v for _, used, expire_at in counters for v in (used, expire_at))))
        return int(reply[0]), int(reply[1]) if len(reply) > 1 else 0

    # -- restore_refs.lua ------------------------------------------------------------------
    async def restore_refs(self, refs_key: str, *, now: int, ttl_ms: int,
                           records: Sequence[tuple[bytes, int, int]],
                           markers: Sequence[tuple[str, str, int]] = ()) -> int:
        """Put back absent idempotency records into the user's ref buckets (``refs_key``):
        (field and head, remaining, debit time ms) each; and closed-hold markers (key,
        value, expire-at ms). Returns how many were written."""
        if not records and not markers:
            return 0
        reply = await self._run(
            SCRIPTS["restore_refs"], [refs_key, *(key for key, _, _ in markers)],
            (now, ttl_ms, len(records), *(v for rec in records for v in rec),
             *(v for _, value, expire_at in markers for v in (value, expire_at))))
        return int(reply[1])

    # -- load_catalog.lua ------------------------------------------------------------------
    async def load_catalog(self, plans_key: str, *, version: int,
                           fields: Sequence[str]) -> int:
        """Replace a shard's catalog copy if older than ``version``: 1 replaced, 0 not."""
        return int(await self._run(SCRIPTS["load_catalog"], (plans_key,), (version, *fields)))

    # -- set_plan.lua ----------------------------------------------------------------------
    async def set_plan(self, user_key: str, *, plan_code: str, expires_ms: int, version: int,
                       start_ms: int, state_ttl_ms: int) -> int:
        """Write through a committed plan assignment (``start_ms``: when it began, what a
        cycle meter counts from): 1 written, 0 Redis had it or newer."""
        return int(await self._run(SCRIPTS["set_plan"], (user_key,),
                                   (plan_code, expires_ms, version, state_ttl_ms, start_ms),
                                   wait=True))

    # -- apply_payment.lua -----------------------------------------------------------------
    async def apply_payment(
        self, user_key: str, ledger_key: str, *, op: str, outbox_id: int, plan_code: str,
        expires_ms: int, plan_version: int, plan_start_ms: int, state_ttl_ms: int, now: int,
        caller: str, ref: str, user_id: str, credits: Sequence[tuple[str, int, str]],
    ) -> PaymentReply:
        """Apply a committed credit or refund once per outbox row; ``credits`` are
        (meter, micro-units, tx id)."""
        reply = await self._run(
            SCRIPTS["apply_payment"], (user_key, ledger_key),
            (op, outbox_id, plan_code, expires_ms, plan_version, state_ttl_ms, now, caller,
             ref, user_id, len(credits), *(v for triple in credits for v in triple),
             plan_start_ms), wait=True)
        return PaymentReply(Status(reply[0]), reply[1], reply[2] if len(reply) > 2 else "")

    # -- ledger_lag.lua --------------------------------------------------------------------
    async def ledger_lag(self, streams: Sequence[str]) -> list[tuple[int, int]]:
        """Per stream, in order: (unflushed entries, epoch ms of the oldest or 0). One call
        for all on one Redis; on a cluster one call per hash slot (concurrent)."""
        groups = self.redis.slot_groups(streams)
        replies = await asyncio.gather(*(self._run(SCRIPTS["ledger_lag"], group, ())
                                         for group in groups))
        by_stream = dict(zip((s for g in groups for s in g),
                             (lag for reply in replies for lag in parse_ledger_lag(reply)),
                             strict=True))
        return [by_stream[s] for s in streams]

    # -- reserve.lua -----------------------------------------------------------------------
    async def reserve(
        self, user_key: str, ref_key: str, plans_key: str, ledger_key: str, *, now: int,
        windows: Windows, limits: DebitLimits, meter: str, units: int, ref_record: bytes,
        hold_id: str, tx_id: str, expiry_tx: str, ttl_ms: int, max_open: int, ref: str,
        caller: str, action: str, reason: str,
    ) -> list[Any]:
        """Hold ``units`` of ``meter`` for ``ttl_ms`` once per ref (see reserve.lua)."""
        return list(await self._run(
            SCRIPTS["reserve"], (user_key, ref_key, plans_key, ledger_key),
            (now, windows.day_id, windows.day_start_ms, windows.day_end_ms, windows.month_id,
             windows.month_end_ms, limits.idempotency_ttl_ms, limits.state_ttl_ms,
             limits.backlog_limit, limits.default_plan, meter, units, ref_record, hold_id,
             tx_id, expiry_tx, ttl_ms, max_open, ref, caller, action, reason)))

    # -- settle.lua ------------------------------------------------------------------------
    async def settle(
        self, user_key: str, plans_key: str, ledger_key: str, *, now: int, windows: Windows,
        limits: DebitLimits, hold_id: str, op: str, units: int, partial: bool, tx_id: str,
        caller: str,
    ) -> list[Any]:
        """Settle (``op`` 'settle', debiting ``units``) or release a hold (settle.lua)."""
        return list(await self._run(
            SCRIPTS["settle"], (user_key, plans_key, ledger_key),
            (now, windows.day_id, windows.day_start_ms, windows.day_end_ms, windows.month_id,
             windows.month_end_ms, limits.idempotency_ttl_ms, limits.grace_ms,
             limits.default_plan, hold_id, op, units, "1" if partial else "0", tx_id, caller)))

    # -- extend.lua ------------------------------------------------------------------------
    async def extend(self, user_key: str, ledger_key: str, *, now: int, limits: DebitLimits,
                     hold_id: str, ttl_ms: int, tx_id: str, caller: str) -> list[Any]:
        """Push a hold's expiry to ``ttl_ms`` from now (extend.lua)."""
        return list(await self._run(
            SCRIPTS["extend"], (user_key, ledger_key),
            (now, hold_id, ttl_ms, tx_id, caller, limits.idempotency_ttl_ms,
             limits.state_ttl_ms)))

    # -- expire_holds.lua ------------------------------------------------------------------
    async def expire_holds(self, holds_key: str, ledger_key: str, *, now: int, limit: int,
                           idempotency_ttl_ms: int) -> tuple[int, int]:
        """Expire a shard's due holds: (expired, looked at)."""
        reply = await self._run(SCRIPTS["expire_holds"], (holds_key, ledger_key),
                                (now, limit, idempotency_ttl_ms))
        return int(reply[0]), int(reply[1])
