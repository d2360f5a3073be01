"""The scripts' replies: the status codes and the decoded shapes of debit and check."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple


class Status(IntEnum):
    """First element of every script reply (mirrors the constants in _common.lua)."""

    OK = 1
    DUPLICATE = 2
    REF_REUSED = 3
    INSUFFICIENT = 4
    NOT_LOADED = 5
    STALE_WINDOW = 6
    BACKLOG = 7
    HOLD_GONE = 10
    TOO_MANY_HOLDS = 11


#: Status by its code (an index is faster than ``Status(code)`` on the hot path).
_STATUS_BY_CODE: dict[int, Status] = {s.value: s for s in Status}


@dataclass(slots=True)
class DebitReply:
    """The decoded reply of debit.lua (fields unused by a status are zero or empty; the
    rule's limit, period and plan status come only with INSUFFICIENT)."""

    status: Status
    tx_id: str = ""
    remaining: int = 0
    from_allowance: int = 0
    from_credits: int = 0
    limit: int = 0
    period: str = ""
    period_end_ms: int = 0
    plan_code: str = ""
    plan_status: str = ""
    detail: str = ""  # NOT_LOADED: what is missing
    now_ms: int = 0  # STALE_WINDOW: Redis' clock
    backlog: int = 0  # BACKLOG: entries in the shard stream

    @classmethod
    def decode(cls, reply: list[Any], tx_id: str, amount: int) -> DebitReply:
        """Turn the flat script reply into fields, by status; ``tx_id`` and ``amount`` are
        the debit's own (an OK reply leaves out what the caller knows)."""
        status = _STATUS_BY_CODE[reply[0]]
        if status is Status.OK:
            _, remaining, from_credits, code = reply
            return cls(status, tx_id, remaining, amount - from_credits, from_credits,
                       plan_code=code)
        if status is Status.DUPLICATE:
            return cls(status, tx_id=reply[1], remaining=reply[2])
        if status is Status.INSUFFICIENT:
            rem, limit, period, end, code, pstatus = reply[1:7]
            return cls(status, remaining=rem, limit=limit, period=period, period_end_ms=end,
                       plan_code=code, plan_status=pstatus)
        if status is Status.NOT_LOADED:
            return cls(status, detail=reply[1])
        if status is Status.STALE_WINDOW:
            return cls(status, now_ms=reply[1])
        if status is Status.BACKLOG:
            return cls(status, backlog=reply[1])
        return cls(status)


class MeterView(NamedTuple):
    """One meter of a check: its rule, usage and what remains (micro-units). A tuple: a
    full check makes one a meter, and a frozen dataclass's constructor cost 8 times more."""

    meter: str
    period: str
    limit: int
    used: int
    credits: int
    remaining: int
    period_end_ms: int
    held: int = 0  # units kept by open holds (remaining is what is left after them)


@dataclass(frozen=True, slots=True)
class CheckReply:
    """The decoded reply of one check of check_many.lua."""

    status: Status
    plan_code: str = ""
    plan_status: str = ""
    assigned_plan: str = ""
    expires_ms: int = 0
    meters: tuple[MeterView, ...] = ()
    detail: str = ""
    now_ms: int = 0

    @classmethod
    def decode(cls, reply: list[Any]) -> CheckReply:
        """Turn the flat script reply into fields, by status."""
        status = Status(reply[0])
        if status is Status.OK:
            code, pstatus, assigned, exp, n = reply[1:6]
            rows = reply[6:]
            assert len(rows) == 8 * n, "check_many.lua answers eight values per meter"
            meters = tuple(MeterView(*rows[i : i + 8]) for i in range(0, len(rows), 8))
            return cls(status, code, pstatus, assigned, exp, meters)
        if status is Status.NOT_LOADED:
            return cls(status, detail=reply[1])
        if status is Status.STALE_WINDOW:
            return cls(status, now_ms=reply[1])
        return cls(status)
