"""Payment notifications as the provider sends them (YooKassa's format): parsed and
checked, never trusted before a verifier has seen them.

The body is ``{"type": "notification", "event": "payment.succeeded" | "payment.canceled" |
"refund.succeeded", "object": {...}}``; a payment's ``metadata`` carries ``user_id``,
``plan_code``, optionally ``units_chat``, ``units_tpl`` and ``order_id`` (default: the
payment id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from core.amounts import AmountError, exact_number, read_amount, to_micro
from core.errors import Rejected
from core.ids import MAX_REF, PRINTABLE_PATTERN

#: The status each event's object must have (as the verified source says).
EVENTS = {"payment.succeeded": "succeeded", "payment.canceled": "canceled",
          "refund.succeeded": "succeeded"}
#: JSON with every non-integer number as an exact Decimal (never a float).
_DECODER = msgspec.json.Decoder(float_hook=exact_number)

@dataclass(frozen=True, slots=True)
class Notification:
    """A verified notification: the event and the object as the trusted source gave it."""

    event: str
    object_id: str
    status: str
    amount: Decimal
    currency: str
    payment_id: str  # the payment itself, or the payment a refund belongs to
    metadata: dict[str, Any] = field(default_factory=dict)


def text_field(value: Any, name: str, limit: int = MAX_REF) -> str:
    """An id or code of the object: what the API asks of its own (PRINTABLE_PATTERN)."""
    if not isinstance(value, str) or not value:
        raise Rejected(422, "invalid_notification", "must be a non-empty string", field=name)
    if len(value) > limit or re.match(PRINTABLE_PATTERN, value) is None:
        raise Rejected(422, "invalid_notification",
                       f"must be at most {limit} printable characters, not blank", field=name)
    return value


def known_event(event: object) -> str | None:
    """``event`` if it names a notification this service handles (any JSON value may
    arrive: a list or an object is unhashable, so the type is checked first), else None."""
    return event if isinstance(event, str) and event in EVENTS else None


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """The event name and raw object of a notification body."""
    try:
        data = _DECODER.decode(body)
    except msgspec.ValidationError as exc:  # JSON, with a number no decoder can hold
        raise Rejected(422, "invalid_notification", f"a number is out of range: {exc}") \
            from None
    except msgspec.DecodeError as exc:
        raise Rejected(422, "malformed_json", f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected(422, "invalid_notification", "body must be a JSON object")
    event = known_event(data.get("event"))
    if event is None:
        raise Rejected(422, "unknown_event", f"event must be one of {sorted(EVENTS)}",
                       field="event")
    obj = data.get("object")
    if not isinstance(obj, dict):
        raise Rejected(422, "invalid_notification", "must be an object", field="object")
    return event, obj


def parse_object(event: str, obj: dict[str, Any]) -> Notification:
    """Check a payment or refund object (YooKassa's API v3 shape)."""
    object_id = text_field(obj.get("id"), "object.id")
    status = text_field(obj.get("status"), "object.status", 32)
    money = obj.get("amount")
    if not isinstance(money, dict):
        raise Rejected(422, "invalid_notification", "must be an object", field="object.amount")
    try:
        amount = read_amount(money.get("value"))
    except (TypeError, ValueError):
        raise Rejected(422, "invalid_notification", "must be a decimal amount",
                       field="object.amount.value") from None
    # the size first: quantize raises on a value past the context's 28 digits (1e100)
    if not amount.is_finite() or amount < 0 or amount > 10**15 \
            or amount != amount.quantize(Decimal("0.01")):
        raise Rejected(422, "invalid_notification",
                       "must be a non-negative amount with at most 2 decimal places",
                       field="object.amount.value")
    currency = text_field(money.get("currency"), "object.amount.currency", 3)
    if not (len(currency) == 3 and currency.isascii() and currency.isupper()):
        raise Rejected(422, "invalid_notification", "must be an ISO 4217 code",
                       field="object.amount.currency")
    if event.startswith("refund."):
        if amount == 0:  # payment_refunds.amount > 0: a refund of nothing is not one
            raise Rejected(422, "invalid_notification", "a refund must be of a positive amount",
                           field="object.amount.value")
        payment_id = text_field(obj.get("payment_id"), "object.payment_id")
        metadata: Any = {}
    else:
        payment_id = object_id
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise Rejected(422, "invalid_notification", "must be an object",
                           field="object.metadata")
    return Notification(event, object_id, status, amount, currency, payment_id, metadata)


def units_field(metadata: dict[str, Any], name: str) -> int:
    raw = metadata.get(name)
    if raw is None or raw == "":
        return 0
    try:
        return to_micro(read_amount(raw), allow_zero=True)
    except (AmountError, TypeError, ValueError) as exc:
        raise Rejected(422, "invalid_notification", f"invalid units: {exc}",
                       field=f"object.metadata.{name}") from None
