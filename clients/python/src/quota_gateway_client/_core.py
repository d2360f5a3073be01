"""What the sync and async clients share: building each request, reading each answer,
the retry policy. No I/O here."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, urlencode

import msgspec

from quota_gateway_client import models as m
from quota_gateway_client.errors import InvalidInput, QuotaGatewayError, error_from

Q = "/internal/billing/quota"
B = "/internal/billing"
#: Answers retried (with the same body, so the same ref): the service, Redis or
#: PostgreSQL unavailable, or a proxy in front of it failing.
RETRY_STATUSES = frozenset({502, 503, 504})
#: What units and amounts may be given as.
Units = Decimal | int | str | float

_encode = msgspec.json.Encoder(decimal_format="number").encode
_decode_any = msgspec.json.Decoder(float_hook=Decimal).decode
_DECODERS: dict[type[Any], Any] = {}


def decoder(kind: type[Any]) -> Any:
    """A cached msgspec decoder of ``kind``."""
    found = _DECODERS.get(kind)
    if found is None:
        found = _DECODERS[kind] = msgspec.json.Decoder(kind).decode
    return found


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How network failures and 502/503/504 answers are retried.

    At most ``attempts`` tries of one call (1: never retry), and no retry that would start
    more than ``total_s`` after the first try began (a try itself is bounded by the
    client's ``timeout``). The n-th retry waits a random time between half and all of
    ``min(max_backoff_s, backoff_s * 2**(n-1))`` ("equal jitter": clients that failed
    together do not come back together), and at least the 503's ``Retry-After`` when it
    fits in ``max_retry_after_s``. Every retry sends the same body: the same ``ref``,
    ``order_id`` or ``hold_id``, so the service answers a repeat with the original result.
    """

    attempts: int = 4
    total_s: float = 10.0
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    max_retry_after_s: float = 2.0
    #: The jitter's source (seed one to replay a test).
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def delay(self, attempt: int, elapsed: float, retry_after: str | None) -> float | None:
        """The wait before try ``attempt + 1``, or None: give up."""
        if attempt >= self.attempts:
            return None
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        wait = self.rng.uniform(ceiling / 2, ceiling)
        hint = _seconds(retry_after)
        if hint is not None and hint <= self.max_retry_after_s:
            wait = max(wait, hint + self.rng.uniform(0, ceiling / 2))
        if elapsed + wait > self.total_s:
            return None
        return wait


NO_RETRY = RetryPolicy(attempts=1)


def _seconds(header: str | None) -> float | None:
    if not header:
        return None
    try:
        value = float(header)
    except ValueError:
        return None  # an HTTP date: not sent by the service
    return value if value >= 0 else None


def new_ref() -> str:
    """A ref for a caller that gave none: unique, and kept for every retry of the call."""
    return str(uuid.uuid4())


def amount(value: Units, field: str) -> Decimal | int:
    """An amount as sent: exact (a float is taken by its shortest repr, 0.1 as "0.1")."""
    if isinstance(value, bool):
        raise TypeError(f"{field}: a bool is not an amount")
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, Decimal):
            exact = value
        elif isinstance(value, str):
            exact = Decimal(value.strip())
        elif isinstance(value, float):
            exact = Decimal(repr(value))
        else:
            raise TypeError(f"{field}: {type(value).__name__} is not an amount")
    except InvalidOperation:
        raise InvalidInput(f"not a number: {value!r}", field=field, code="invalid") from None
    if not exact.is_finite():
        raise InvalidInput(f"not a finite number: {value!r}", field=field, code="invalid")
    return exact


class Call:
    """One request of the API and how its answer is read."""

    __slots__ = ("body", "method", "path", "read", "ref")

    def __init__(self, method: str, path: str, body: Any, read: Any, ref: str = "") -> None:
        self.method = method
        self.path = path
        self.body = None if body is None else _encode(body)
        self.read = read  # (status, data, call) -> result, or raises
        self.ref = ref


def fail(status: int, data: bytes, retry_after: str | None = None) -> QuotaGatewayError:
    """The error an answer means."""
    try:
        body = _decode_any(data) if data else {}
    except msgspec.DecodeError:
        body = {"error": {"code": None, "message": data[:200].decode(errors="replace")}}
    return error_from(status, body, _seconds(retry_after))


def _ok(kind: type[Any]) -> Any:
    decode = decoder(kind)

    def read(status: int, data: bytes, call: Call) -> Any:
        if status == 200:
            return decode(data)
        raise fail(status, data)

    return read


def _original(kind: type[Any]) -> Any:
    """200, or a 409 that carries the original result (duplicate ref, order): returned as
    such, marked ``duplicate``; ``ref`` set to the call's."""
    decode = decoder(kind)

    def read(status: int, data: bytes, call: Call) -> Any:
        if status == 200:
            result = decode(data)
        elif status == 409:
            try:
                result = decode(data)
            except msgspec.ValidationError:  # a conflict of another kind
                raise fail(status, data) from None
            result.duplicate = True
        else:
            raise fail(status, data)
        if call.ref:
            result.ref = call.ref
        return result

    return read


READ_CHECK = _ok(m.QuotaCheck)
READ_DEBIT = _original(m.DebitResult)
READ_BALANCE_DEBIT = _original(m.BalanceDebitResult)
READ_BALANCE_CHECK = _ok(m.BalanceCheck)
READ_BALANCE = _ok(m.Balance)
READ_CREDIT = _original(m.CreditResult)
READ_TRANSACTIONS = _ok(m.TransactionsPage)
READ_RESERVE = _original(m.Reservation)
READ_SETTLE = _ok(m.SettleResult)
READ_RELEASE = _ok(m.ReleaseResult)
READ_EXTEND = _ok(m.ExtendResult)
READ_BATCH = _ok(m.BatchAnswer)


def check(user_id: str) -> Call:
    return Call("GET", f"{Q}/check/{quote(user_id, safe='')}", None, READ_CHECK)


def debit(user_id: str, action: str, units: Units, ref: str | None) -> Call:
    ref = ref or new_ref()
    body = {"user_id": user_id, "action": action, "units": amount(units, "units"), "ref": ref}
    return Call("POST", f"{Q}/debit", body, READ_DEBIT, ref)


def debit_item(item: Any) -> dict[str, Any]:
    """One batch item, a mapping or a (user_id, action, units[, ref]) tuple, with its ref."""
    if isinstance(item, Mapping):
        user_id, action, units, ref = (item["user_id"], item["action"], item["units"],
                                       item.get("ref"))
    else:
        user_id, action, units, *rest = item
        ref = rest[0] if rest else None
    return {"user_id": user_id, "action": action, "units": amount(units, "units"),
            "ref": ref or new_ref()}


def debit_batch(items: list[dict[str, Any]]) -> Call:
    return Call("POST", f"{Q}/debit/batch", {"items": items}, READ_BATCH)


_READ_ITEM = decoder(m.DebitResult)


def batch_item(status: int, raw: msgspec.Raw, ref: str) -> m.DebitResult | QuotaGatewayError:
    """One batch entry as ``debit`` would return it (a duplicate as the original result),
    or the error it would raise."""
    data = bytes(raw)
    if status in (200, 409):
        try:
            result: m.DebitResult = _READ_ITEM(data)
        except msgspec.ValidationError:
            return fail(status, data)
        result.duplicate = status == 409
        result.ref = ref
        return result
    return fail(status, data)


def merge_batch(answer: m.BatchAnswer, part: list[int], payload: list[dict[str, Any]],
                out: list[Any]) -> list[int]:
    """Each entry of a batch's answer into ``out`` at its item's index; the indexes to send
    again (answered 502/503/504)."""
    if len(answer.results) != len(part):
        raise QuotaGatewayError(f"the batch answered {len(answer.results)} entries for "
                                f"{len(part)} items")
    again: list[int] = []
    for index, entry in zip(part, answer.results, strict=True):
        if entry.status in RETRY_STATUSES:
            again.append(index)
        out[index] = batch_item(entry.status, entry.body, payload[index]["ref"])
    return again


def balance_debit(user_id: str, units: Units, ref: str | None, reason: str) -> Call:
    ref = ref or new_ref()
    body = {"user_id": user_id, "units": amount(units, "units"), "ref": ref, "reason": reason}
    return Call("POST", f"{B}/debit", body, READ_BALANCE_DEBIT, ref)


def balance_check(user_id: str, units: Units) -> Call:
    body = {"user_id": user_id, "units": amount(units, "units")}
    return Call("POST", f"{B}/check", body, READ_BALANCE_CHECK)


def balance(user_id: str) -> Call:
    return Call("GET", f"{B}/balance?{urlencode({'user_id': user_id})}", None, READ_BALANCE)


def credit(order_id: str, user_id: str, plan_code: str, units_chat: Units, units_tpl: Units,
           amount_paid: Units | None, currency: str | None) -> Call:
    body: dict[str, Any] = {
        "order_id": order_id, "user_id": user_id, "plan_code": plan_code,
        "units_chat": amount(units_chat, "units_chat"),
        "units_tpl": amount(units_tpl, "units_tpl")}
    if amount_paid is not None:
        body["amount"] = amount(amount_paid, "amount")
    if currency is not None:
        body["currency"] = currency
    return Call("POST", f"{Q}/credit", body, READ_CREDIT)


def transactions(user_id: str, limit: int | None, before: str | None) -> Call:
    query: dict[str, Any] = {"user_id": user_id}
    if limit is not None:
        query["limit"] = limit
    if before:
        query["before"] = before
    return Call("GET", f"{B}/transactions?{urlencode(query)}", None, READ_TRANSACTIONS)


def reserve(user_id: str, action: str, units: Units, ref: str | None, ttl_s: float) -> Call:
    ref = ref or new_ref()
    body = {"user_id": user_id, "action": action, "units": amount(units, "units"),
            "ref": ref, "ttl_s": ttl_s}
    return Call("POST", f"{Q}/reserve", body, READ_RESERVE, ref)


def settle(hold_id: str, units: Units, partial: bool) -> Call:
    body: dict[str, Any] = {"hold_id": hold_id, "units": amount(units, "units")}
    if partial:
        body["partial"] = True
    return Call("POST", f"{Q}/settle", body, READ_SETTLE)


def release(hold_id: str) -> Call:
    return Call("POST", f"{Q}/release", {"hold_id": hold_id}, READ_RELEASE)


def extend(hold_id: str, ttl_s: float) -> Call:
    return Call("POST", f"{Q}/extend", {"hold_id": hold_id, "ttl_s": ttl_s}, READ_EXTEND)


def headers(key: str, user_agent: str | None) -> dict[str, str]:
    out = {"X-Internal-Key": key, "Content-Type": "application/json",
           "Accept": "application/json"}
    if user_agent:
        out["User-Agent"] = user_agent
    return out
