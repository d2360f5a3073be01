"""The ledger event as the scripts write it to a shard stream, checked again on read.

debit.lua validates before it writes; this module validates what it reads, so a corrupt
or foreign entry is set aside (poison) instead of reaching the ledger.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

KINDS = frozenset({"debit", "credit", "refund", "hold", "commit", "release", "expiry",
                   "extend"})
#: The kinds of a hold's events (layout ``v3``): the ledger's ``ref`` holds the hold id.
HOLD_KINDS = frozenset({"hold", "commit", "release", "expiry", "extend"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX = 2**53


class BadEvent(ValueError):
    """A stream entry that is not a valid ledger event."""


@dataclass(slots=True)
class LedgerEvent:
    """One accepted state change, ready for the ledger table. Not changed once made (a
    changed copy is ``dataclasses.replace``'s); not frozen, because the reconciler makes
    one an entry and a frozen dataclass's constructor cost 3.0 µs against 0.56."""

    tx_id: uuid.UUID
    kind: str
    user_id: str
    meter: str
    amount: int
    from_allowance: int
    from_credits: int
    period_id: str
    ref: str | None
    reason: str | None
    caller: str
    action: str | None
    plan_code: str | None
    occurred_at: datetime
    shard: int
    stream_id: str | None  # None: written through, not read from a stream
    remaining: int | None = None  # debits: what was left of the meter after it
    #: debits: how many times its ref was debited before, each at least the idempotency TTL
    #: before the next (set by the writer, migration 0007)
    ref_round: int = 0
    #: hold events: the hold's units, its expiry then, and the ref of the reserve
    hold_units: int = 0
    hold_expires: datetime | None = None
    hold_ref: str | None = None
    hold_expiry_tx: uuid.UUID | None = None


#: The values of an event's single stream field ``e``, in order, after the version ``v1``.
#: ``rm`` (a debit's remaining amount) is last and optional: refunds, and debits written
#: before it existed, end at ``ts``.
LAYOUT = ("k", "tx", "u", "m", "a", "al", "cr", "p", "ref", "rs", "c", "ac", "pl", "ts", "rm")
#: Debits since ``v2``: what the hot path knows before the script runs comes first (it
#: makes that head, ``debit_event_head``), then what the script decided.
LAYOUT_V2 = ("k", "tx", "u", "m", "a", "ref", "rs", "c", "ac", "al", "cr", "p", "pl", "ts",
             "rm")
#: A hold's events since ``v3`` (lua/_common.lua, hold_event): what names the hold first,
#: then what the script decided. ``h`` is the hold id, ``hu`` its units, ``hx`` its expiry
#: (ms; empty for a settle or release), ``ref`` the reserve's ref, ``xt`` the tx id of
#: its expiry (chosen at the reserve).
LAYOUT_V3 = ("k", "tx", "u", "m", "h", "hu", "ref", "rs", "c", "ac", "a", "al", "cr", "p",
             "pl", "ts", "rm", "hx", "xt")
SEPARATOR = "\x1f"


def debit_event_head(tx_id: str, user_id: str, meter: str, amount: int, ref: str,
                     reason: str, caller: str, action: str) -> str:
    """The first values of a ``v2`` debit event (debit_many.lua appends the rest); ids, refs
    and reasons hold no control characters (hotpath/schemas.py), so none holds the
    separator."""
    return f"v2\x1fdebit\x1f{tx_id}\x1f{user_id}\x1f{meter}\x1f-{amount}\x1f{ref}\x1f{reason}" \
        f"\x1f{caller}\x1f{action}"


def unpack(fields: dict[str, str]) -> dict[str, str]:
    """The named values of a stream entry (``{"e": "v1\x1f..."}`` or ``v2``)."""
    packed = fields.get("e")
    if packed is None:
        raise BadEvent("missing field 'e'")
    version, *values = packed.split(SEPARATOR)
    if version == "v1" and len(values) in (len(LAYOUT) - 1, len(LAYOUT)):
        return dict(zip(LAYOUT, values, strict=False))
    if version == "v2" and len(values) == len(LAYOUT_V2) and values[0] == "debit":
        return dict(zip(LAYOUT_V2, values, strict=True))
    if version == "v3" and len(values) == len(LAYOUT_V3) and values[0] in HOLD_KINDS:
        return dict(zip(LAYOUT_V3, values, strict=True))
    raise BadEvent(f"unknown event layout {version!r} with {len(values)} values")


def _int(fields: dict[str, str], name: str, *, signed: bool = False) -> int:
    raw = fields.get(name)
    if raw is None:
        raise BadEvent(f"missing field {name!r}")
    return _number(raw, name, signed=signed)


def _number(raw: str, name: str, *, signed: bool = False) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadEvent(f"field {name!r} is not an integer: {raw!r}") from None
    if abs(value) >= _MAX or (value < 0 and not signed):
        raise BadEvent(f"field {name!r} out of range: {value}")
    return value


def decode(shard: int, stream_id: str, entry_fields: dict[str, str]) -> LedgerEvent:
    """Check and convert one stream entry; BadEvent says what is wrong."""
    packed = entry_fields.get("e")
    if packed is not None and packed.startswith(_V2_DEBIT):
        values = packed.split(SEPARATOR)
        if len(values) == 1 + len(LAYOUT_V2):
            return _debit_v2(shard, stream_id, values)
    fields = unpack(entry_fields)
    kind = fields.get("k", "")
    if kind not in KINDS:
        raise BadEvent(f"unknown event kind {kind!r}")
    try:
        tx_id = uuid.UUID(fields.get("tx", ""))
    except ValueError:
        raise BadEvent(f"invalid tx id {fields.get('tx')!r}") from None
    user = fields.get("u", "")
    if not user:
        raise BadEvent("missing user")
    amount = _int(fields, "a", signed=True)
    allowance, credits = _int(fields, "al"), _int(fields, "cr")
    if kind == "debit" and (amount >= 0 or -amount != allowance + credits):
        raise BadEvent(f"debit split does not add up: {amount} != -({allowance} + {credits})")
    if kind == "refund" and (allowance != 0 or -amount != credits):
        raise BadEvent(f"a refund takes credits only: {amount} != -{credits}")
    if kind in HOLD_KINDS:
        return _hold_event(kind, tx_id, user, fields, amount, allowance, credits, shard,
                           stream_id)
    return LedgerEvent(
        tx_id=tx_id, kind=kind, user_id=user, meter=fields.get("m", ""), amount=amount,
        from_allowance=allowance, from_credits=credits, period_id=fields.get("p", ""),
        ref=fields.get("ref") or None, reason=fields.get("rs") or None,
        caller=fields.get("c", ""), action=fields.get("ac") or None,
        plan_code=fields.get("pl") or None,
        occurred_at=_EPOCH + timedelta(milliseconds=_int(fields, "ts")),
        shard=shard, stream_id=stream_id,
        remaining=_int(fields, "rm") if kind == "debit" and fields.get("rm") else None,
    )


_V2_DEBIT = f"v2{SEPARATOR}debit{SEPARATOR}"


def _debit_v2(shard: int, stream_id: str, v: list[str]) -> LedgerEvent:
    """A ``v2`` debit (every event of the hot path), read by position: the same checks as
    ``decode``'s, without the dict of named values (the reconciler's busiest line)."""
    # v: version, then LAYOUT_V2: k tx u m a ref rs c ac al cr p pl ts rm
    try:
        tx_id = uuid.UUID(v[2])
    except ValueError:
        raise BadEvent(f"invalid tx id {v[2]!r}") from None
    if not v[3]:
        raise BadEvent("missing user")
    amount = _number(v[5], "a", signed=True)
    allowance, credits = _number(v[10], "al"), _number(v[11], "cr")
    if amount >= 0 or -amount != allowance + credits:
        raise BadEvent(f"debit split does not add up: {amount} != -({allowance} + {credits})")
    return LedgerEvent(
        tx_id=tx_id, kind="debit", user_id=v[3], meter=v[4], amount=amount,
        from_allowance=allowance, from_credits=credits, period_id=v[12], ref=v[6] or None,
        reason=v[7] or None, caller=v[8], action=v[9] or None, plan_code=v[13] or None,
        occurred_at=_EPOCH + timedelta(milliseconds=_number(v[14], "ts")), shard=shard,
        stream_id=stream_id, remaining=_number(v[15], "rm") if v[15] else None,
    )


def _uuid(fields: dict[str, str], name: str) -> uuid.UUID:
    try:
        return uuid.UUID(fields.get(name, ""))
    except ValueError:
        raise BadEvent(f"invalid {name!r}: {fields.get(name)!r}") from None


def _hold_event(kind: str, tx_id: uuid.UUID, user: str, fields: dict[str, str], amount: int,
                allowance: int, credits: int, shard: int, stream_id: str) -> LedgerEvent:
    """A ``v3`` event: the ledger row names the hold in ``ref``; only a settle ('commit')
    moves an amount, split like a debit's."""
    hold_id = fields.get("h", "")
    if not hold_id:
        raise BadEvent("a hold event names no hold")
    if kind == "commit":
        if amount > 0 or -amount != allowance + credits:
            raise BadEvent(f"settle split does not add up: {amount} != -({allowance} + "
                           f"{credits})")
    elif amount or allowance or credits:
        raise BadEvent(f"a {kind} event moves no amount")
    hold_units = _int(fields, "hu")
    if hold_units <= 0:
        raise BadEvent("a hold keeps a positive amount")
    expires = fields.get("hx")
    if kind in ("hold", "extend", "expiry") and not expires:
        raise BadEvent(f"a {kind} event carries the hold's expiry")
    return LedgerEvent(
        tx_id=tx_id, kind=kind, user_id=user, meter=fields.get("m", ""), amount=amount,
        from_allowance=allowance, from_credits=credits, period_id=fields.get("p", ""),
        ref=hold_id, reason=fields.get("rs") or None, caller=fields.get("c", ""),
        action=fields.get("ac") or None, plan_code=fields.get("pl") or None,
        occurred_at=_EPOCH + timedelta(milliseconds=_int(fields, "ts")), shard=shard,
        stream_id=stream_id, remaining=_int(fields, "rm") if fields.get("rm") else None,
        hold_units=hold_units,
        hold_expires=_EPOCH + timedelta(milliseconds=_int(fields, "hx")) if expires else None,
        hold_ref=fields.get("ref") or None, hold_expiry_tx=_uuid(fields, "xt"),
    )


def columns(events: list[LedgerEvent]) -> tuple[list[object], ...]:
    """The batch as the 18 arrays of the flush_events query, in its parameter order."""
    return (
        [e.tx_id for e in events], [e.kind for e in events], [e.user_id for e in events],
        [e.meter for e in events], [e.amount for e in events],
        [e.from_allowance for e in events], [e.from_credits for e in events],
        [e.period_id for e in events], [e.ref for e in events], [e.reason for e in events],
        [e.caller for e in events], [e.action for e in events],
        [e.plan_code for e in events], [e.shard for e in events],
        [e.stream_id for e in events], [e.occurred_at for e in events],
        [e.remaining for e in events], [e.ref_round for e in events],
    )
