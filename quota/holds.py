"""Holds (reservations): reserve an estimate, settle the actual cost, release, extend.

A hold keeps units of one meter out of what any other debit or hold may take. Its id
carries the user it belongs to (``<32 hex>.<base64url of the user id>``), so a settle,
release or extend names only the hold and still runs as one script call in the user's
hash slot. The decisions are made in reserve.lua, settle.lua and extend.lua; this module
builds their arguments, loads the user when Redis lacks it, and reads their replies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from core import metrics, refs
from core.errors import DependencyUnavailable, invariant
from core.ids import user_id_problem
from lua.periods import Windows
from lua.replies import Status
from lua.scripts import DebitLimits
from quota.loading import Loader
from quota.runtime import Runtime

_HOLD_ID = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9_-]{1,176})")


def new_hold_id(user_id: str) -> str:
    """A fresh hold id for one of ``user_id``'s holds."""
    tail = base64.urlsafe_b64encode(user_id.encode()).rstrip(b"=").decode()
    return f"{uuid.uuid4().hex}.{tail}"


def hold_owner(hold_id: str) -> str | None:
    """The user a hold id belongs to, or None when it is not a hold id."""
    match = _HOLD_ID.fullmatch(hold_id)
    if match is None:
        return None
    tail = match.group(2)
    try:
        user_id = base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user_id if user_id_problem(user_id) is None else None


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reserve's outcome: OK (a new hold) or DUPLICATE (the ref's hold), or a refusal."""

    status: Status
    hold_id: str = ""
    remaining: int = 0
    expires_ms: int = 0
    plan_code: str = ""
    limit: int = 0  # INSUFFICIENT: the rule
    period: str = ""
    period_end_ms: int = 0
    open_holds: int = 0  # TOO_MANY_HOLDS


@dataclass(frozen=True, slots=True)
class Closed:
    """A settle's or release's outcome. OK or DUPLICATE: the amounts; HOLD_GONE: ``state``
    ('settled', 'released', 'expired' or 'unknown'); INSUFFICIENT: ``available``."""

    status: Status
    settled: int = 0
    from_allowance: int = 0
    from_credits: int = 0
    remaining: int = 0
    released: int = 0
    tx_id: str = ""
    state: str = ""
    available: int = 0


@dataclass(frozen=True, slots=True)
class Extended:
    """An extend's outcome: OK with the new expiry, or HOLD_GONE with ``state``."""

    status: Status
    expires_ms: int = 0
    state: str = ""


class Holds:
    """Runs the hold scripts for one process."""

    def __init__(self, rt: Runtime, loader: Loader, limits: Callable[[], DebitLimits]
                 ) -> None:
        self.rt = rt
        self.loader = loader
        #: The constants the scripts carry, as the engine's debits carry them (the backlog
        #: limit sized from Redis's maxmemory once it is known).
        self.limits = limits

    async def _call(self, user_id: str,
                    attempt: Callable[[Windows], Awaitable[list[Any]]]) -> tuple[Status, list[Any]]:
        """Run ``attempt`` (one script call in the given windows) until it answers other than
        NOT_LOADED (the user is loaded from PostgreSQL) or STALE_WINDOW (new windows)."""
        windows = self.rt.windows()
        for _ in range(self.rt.settings.load_retries + 2):
            reply = await attempt(windows)
            status = Status(reply[0])
            if status is Status.STALE_WINDOW:
                windows = self.rt.calendar.windows(int(reply[1]))
            elif status is Status.NOT_LOADED:
                await self.loader.load(str(reply[1]), user_id, windows)
            else:
                return status, reply
        raise DependencyUnavailable("redis", f"user state of {user_id!r} could not be loaded")

    async def reserve(self, user_id: str, meter: str, units: int, ref: str, ttl_ms: int, *,
                      reason: str = "", caller: str = "", action: str = "") -> Reserved:
        """Hold ``units`` of ``meter`` for ``ttl_ms``, once per (user, ref)."""
        invariant(units > 0 and ttl_ms > 0, "holds keep a positive amount for a while")
        rt, keys = self.rt, self.rt.keys
        shard = keys.shard(user_id)
        hold_id = new_hold_id(user_id)
        tx_id, expiry_tx = rt.new_id(None), rt.new_id(None)
        status, reply = await self._call(user_id, lambda windows: rt.scripts.reserve(
            keys.user(user_id), keys.refs(user_id), keys.plans(shard),
            keys.ledger(shard), now=rt.clock.script_now(), windows=windows,
            limits=self.limits(), meter=meter, units=units,
            ref_record=refs.hold_record(user_id, ref, hold_id, meter, units, reason),
            hold_id=hold_id, tx_id=tx_id, expiry_tx=expiry_tx, ttl_ms=ttl_ms,
            max_open=rt.settings.hold_max_open, ref=ref, caller=caller, action=action,
            reason=reason))
        if status is Status.OK:
            metrics.HOLDS.labels(meter, "created").inc()
            return Reserved(status, hold_id, reply[1], reply[2], reply[3])
        if status is Status.DUPLICATE:
            return Reserved(status, refs.hold_of(refs.reply_bytes(reply[1]),
                                                 hold_id.partition(".")[2]), reply[2])
        if status is Status.INSUFFICIENT:
            rem, limit, period, end, code = reply[1:6]
            return Reserved(status, remaining=rem, limit=limit, period=period,
                            period_end_ms=end, plan_code=code)
        if status is Status.TOO_MANY_HOLDS:
            return Reserved(status, open_holds=reply[1])
        return Reserved(status)

    async def close(self, hold_id: str, op: str, units: int = 0, *, partial: bool = False,
                    caller: str = "") -> Closed:
        """Settle (``op`` 'settle': debit ``units``) or release (``op`` 'release') a hold."""
        user_id = hold_owner(hold_id)
        if user_id is None:
            return Closed(Status.HOLD_GONE, state="unknown")
        rt, keys = self.rt, self.rt.keys
        shard = keys.shard(user_id)
        tx_id = rt.new_id(None)
        status, reply = await self._call(user_id, lambda windows: rt.scripts.settle(
            keys.user(user_id), keys.plans(shard), keys.ledger(shard),
            now=rt.clock.script_now(), windows=windows, limits=self.limits(), hold_id=hold_id,
            op=op, units=units, partial=partial, tx_id=tx_id, caller=caller))
        if status is Status.OK:
            metrics.HOLDS.labels(reply[7], "settled" if op == "settle" else "released").inc()
        if status in (Status.OK, Status.DUPLICATE):
            return Closed(status, *reply[1:7])
        if status is Status.HOLD_GONE:
            return Closed(status, state=reply[1])
        if status is Status.INSUFFICIENT:
            return Closed(status, available=reply[1])
        return Closed(status)

    async def extend(self, hold_id: str, ttl_ms: int, *, caller: str = "") -> Extended:
        """Keep a hold until ``ttl_ms`` from now (never shorter than it was)."""
        user_id = hold_owner(hold_id)
        if user_id is None:
            return Extended(Status.HOLD_GONE, state="unknown")
        rt, keys = self.rt, self.rt.keys
        tx_id = rt.new_id(None)
        status, reply = await self._call(user_id, lambda _: rt.scripts.extend(
            keys.user(user_id), keys.ledger(keys.shard(user_id)), now=rt.clock.script_now(),
            limits=self.limits(), hold_id=hold_id, ttl_ms=ttl_ms, tx_id=tx_id, caller=caller))
        if status is Status.OK:
            return Extended(status, expires_ms=reply[1])
        if status is Status.HOLD_GONE:
            return Extended(status, state=reply[1])
        return Extended(status)

    async def sweep(self, limit: int = 1000) -> int:
        """Expire the due holds of every shard (the reconciler's chore): one short script
        call per shard, sent together; returns how many expired."""
        rt, keys = self.rt, self.rt.keys
        now, ttl_ms = rt.clock.script_now(), self.limits().idempotency_ttl_ms
        done = await asyncio.gather(*(
            rt.scripts.expire_holds(keys.holds(shard), keys.ledger(shard), now=now,
                                    limit=limit, idempotency_ttl_ms=ttl_ms)
            for shard in range(rt.settings.n_shards)))
        return sum(expired for expired, _ in done)
