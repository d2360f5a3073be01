"""Request and response models: validated by msgspec, and the source of the OpenAPI spec.

Amounts arrive as JSON numbers (or strings holding one) and are parsed into ``Amount`` (a
``Decimal``) from their text, then into micro-units by ``core.amounts``: never through a
float. Responses carry plain ``Decimal`` amounts, written as JSON numbers.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from core.amounts import (
    MAX_UNITS,
    SCALE_DIGITS,
    ZERO,
    Amount,
    AmountError,
    decode_hook,
    exact_number,
    to_micro,
)
from core.errors import InvalidInput
from core.ids import CONTROL, END, MAX_ACTION, MAX_REASON, MAX_REF, MAX_USER_ID
from persistence.plans import PLAN_PATTERN

#: Transactions per page: the default and the most one page may ask for.
DEFAULT_PAGE = 50
MAX_PAGE = 500

#: The characters Python's ``\s`` takes for blank besides the control characters. The
#: patterns below name them instead of writing ``\s`` or ``.``, whose meaning differs in the
#: spec's (ECMA) regexes: there ``\s`` also takes U+FEFF and ``.`` stops at U+2028/U+2029.
#: Nor do they look ahead, which makes generating strings from them slow (Hypothesis,
#: schemathesis). In Python they read as core.ids' USER_ID_PATTERN and PRINTABLE_PATTERN
#: do (tests/integration/test_spec.py compares them on every code point).
BLANK = " \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
USER_ID_TEXT = rf"^[{BLANK}]*[^{BLANK}{CONTROL}:][^{CONTROL}:]*{END}"
PRINTABLE_TEXT = rf"^[{BLANK}]*[^{BLANK}{CONTROL}][^{CONTROL}]*{END}"
#: A user id in a URL path cannot hold '/' either: the router splits the path there.
USER_ID_IN_PATH_TEXT = rf"^[{BLANK}]*[^{BLANK}{CONTROL}:/][^{CONTROL}:/]*{END}"
#: The longest plan code PLAN_PATTERN admits.
MAX_PLAN_CODE = 64

UserId = Annotated[str, Meta(
    min_length=1, max_length=MAX_USER_ID, pattern=USER_ID_TEXT,
    description="The user's id (no ':', no control characters, not blank)")]
UserIdInPath = Annotated[str, Meta(
    min_length=1, max_length=MAX_USER_ID, pattern=USER_ID_IN_PATH_TEXT,
    description="The user's id (no ':', no control characters, not blank); in a path, "
                "no '/' either")]
Ref = Annotated[str, Meta(min_length=1, max_length=MAX_REF, pattern=PRINTABLE_TEXT,
                          description="The caller's idempotency key for this debit")]
Reason = Annotated[str, Meta(max_length=MAX_REASON, pattern=rf"^[^{CONTROL}]*{END}")]
#: What an action's name may be; the spec lists the configured ones (ACTION_METERS) that
#: are, as an enum, instead.
ACTION_NAME = rf"^[a-z][a-z0-9_]*{END}"
Action = Annotated[str, Meta(min_length=1, max_length=MAX_ACTION, pattern=ACTION_NAME,
                             extra_json_schema={"x-actions": True})]
PlanCode = Annotated[str, Meta(min_length=1, max_length=MAX_PLAN_CODE,
                               pattern=rf"^{PLAN_PATTERN.pattern}{END}")]
#: A ledger page's cursor as next_before hands it out: ``<epoch ms>_<tx id>`` (or empty:
#: the first page). The handler reads it.
Cursor = Annotated[str, Meta(
    max_length=64, pattern=rf"^(?:[0-9]{{1,14}}_[0-9a-f]{{8}}(?:-[0-9a-f]{{4}}){{3}}"
                           rf"-[0-9a-f]{{12}})?{END}",
    description="next_before of the previous page")]

# An exact amount is read as ``Amount``: a JSON number, or the same digits as a string
# ("2.5"; README, "Amounts"); written as a ``Decimal``, a JSON number. Each kind states its
# bounds and places for the spec (hotpath/openapi.py derives the string form's pattern);
# ``micro``/``money`` and core.amounts hold the rules themselves.
CENT = Decimal("0.01")
#: What one request may pay, in its currency.
MAX_MONEY = Decimal(10) ** 15
Units = Annotated[Amount, Meta(extra_json_schema={
    "exclusiveMinimum": 0, "maximum": MAX_UNITS, "multipleOf": 10.0 ** -SCALE_DIGITS})]
UnitsOrZero = Annotated[Amount, Meta(extra_json_schema={
    "minimum": 0, "maximum": MAX_UNITS, "multipleOf": 10.0 ** -SCALE_DIGITS})]
Money = Annotated[Amount, Meta(extra_json_schema={
    "minimum": 0, "maximum": int(MAX_MONEY), "multipleOf": 0.01})]
#: A time a request sets ahead (a plan's expiry): RFC 3339 with an offset; the spec's
#: pattern admits the dates from two days after it is built (hotpath/openapi.py).
FutureTime = Annotated[datetime, Meta(tz=True, extra_json_schema={"x-future": True})]


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    """Request bodies: unknown fields are an error."""


class QuotaDebitIn(Strict):
    """Seed 000 debit: an action (mapped to a meter) and a number of units."""

    user_id: UserId
    action: Action
    units: Units
    ref: Ref


class BalanceCheckIn(Strict):
    """Seed 002 pre-check."""

    user_id: UserId
    units: Units


class BalanceDebitIn(Strict):
    """Seed 002 debit of the balance meter."""

    user_id: UserId
    units: Units
    ref: Ref
    reason: Reason = ""


#: A hold's time to live in seconds, a JSON number (a duration, not an amount: read to the
#: millisecond); HOLD_MAX_TTL_SECONDS bounds it (the spec shows it: hotpath/openapi.py).
TtlSeconds = Annotated[float, Meta(ge=0.001, extra_json_schema={"x-hold-ttl": True})]
HoldId = Annotated[str, Meta(min_length=34, max_length=210,
                             pattern=rf"^[0-9a-f]{{32}}\.[A-Za-z0-9_-]+{END}",
                             description="A hold id as reserve answered it")]
MeterName = Annotated[str, Meta(min_length=1, max_length=32, pattern=rf"^[a-z][a-z0-9_]*{END}")]


class ReserveIn(Strict):
    """Hold an estimate of an action's (or a meter's) units until settled or released."""

    user_id: UserId
    units: Units
    ref: Ref
    action: Action | None = None
    meter: MeterName | None = None
    ttl_s: TtlSeconds | None = None
    reason: Reason = ""


class SettleIn(Strict):
    """Debit a hold's actual cost (may exceed the estimate) and give back the rest."""

    hold_id: HoldId
    units: UnitsOrZero
    partial: bool = False


class ReleaseIn(Strict):
    """Give back all of a hold."""

    hold_id: HoldId


class ExtendIn(Strict):
    """Keep a hold ``ttl_s`` seconds from now."""

    hold_id: HoldId
    ttl_s: TtlSeconds


class PlanApplyIn(Strict):
    """Assign a plan; without expires_at the plan's duration decides."""

    user_id: UserId
    plan_code: PlanCode
    expires_at: FutureTime | None = None


OrderId = Annotated[str, Meta(min_length=1, max_length=MAX_REF, pattern=PRINTABLE_TEXT,
                              description="Pay-svc's order id: one credit per order")]
Currency = Annotated[str, Meta(pattern=rf"^[A-Z]{{3}}{END}", description="ISO 4217 code")]


class QuotaCreditIn(Strict):
    """Seed 000 credit after a payment: apply the plan and add the credits, once per order."""

    order_id: OrderId
    user_id: UserId
    plan_code: PlanCode
    units_chat: UnitsOrZero = ZERO
    units_tpl: UnitsOrZero = ZERO
    amount: Money | None = None  # what was paid; default: the plan's price
    currency: Currency | None = None  # default: the plan's currency


class PaymentNotificationIn(msgspec.Struct):
    """The payment provider's notification (YooKassa's format), as the spec shows it: the
    webhook verifies the raw body first, then reads it itself (payments.notifications).
    A payment's ``metadata`` carries ``user_id``, ``plan_code``, optionally ``units_chat``,
    ``units_tpl`` and ``order_id``; a refund's object names its ``payment_id``."""

    event: Literal["payment.succeeded", "payment.canceled", "refund.succeeded"]
    object: dict[str, Any]
    type: str = "notification"


T = TypeVar("T")
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_FIELD = re.compile(r"`\$\.([A-Za-z0-9_.\[\]]+)`")
_NAMED = re.compile(r"field `([^`]+)`")


def decode(body: bytes, model: type[T]) -> T:
    """Parse and validate a JSON body; InvalidInput names the field at fault."""
    decoder = _decoders.get(model)
    if decoder is None:
        decoder = _decoders[model] = msgspec.json.Decoder(
            model, dec_hook=decode_hook, float_hook=exact_number)
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        if _WHOLE_FLOAT.search(str(exc)) is None:
            raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}", code="malformed_json") from None
    # An integer written with a fraction of zeros ("30.0") is one in JSON (and in the
    # spec's JSON Schema); msgspec's int takes only "30". Read such a body again, each
    # whole number as an int (amounts are the same number either way).
    try:
        return msgspec.convert(_WHOLE_NUMBERS.decode(body), model, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None


#: msgspec's complaint about a number with a fraction where an int belongs.
_WHOLE_FLOAT = re.compile(r"Expected `int[^`]*`, got `float`")


def _whole_or_exact(text: str) -> int | Decimal:
    """A JSON number with a fraction or exponent: an int when it is a whole one."""
    number = exact_number(text)
    return int(number) if number == number.to_integral_value() else number


_WHOLE_NUMBERS = msgspec.json.Decoder(float_hook=_whole_or_exact)


def _invalid(exc: msgspec.ValidationError) -> InvalidInput:
    text = str(exc)
    match = _FIELD.search(text) or _NAMED.search(text)
    return InvalidInput(text, field=match[1] if match else None)


def micro(value: Decimal, field: str, *, allow_zero: bool = False) -> int:
    """An API amount as micro-units, or InvalidInput naming ``field``."""
    try:
        return to_micro(value, allow_zero=allow_zero)
    except AmountError as exc:
        raise InvalidInput(str(exc), field=field) from None


def money(value: Decimal, field: str) -> Decimal:
    """A paid amount: finite, not negative, at most 2 decimal places (kopecks, cents)."""
    if not value.is_finite() or value < 0 or value > MAX_MONEY \
            or value != value.quantize(CENT):
        raise InvalidInput("must be a non-negative amount with at most 2 decimal places",
                           field=field)
    return value.quantize(CENT)


def _encode_amount(value: Any) -> Any:
    """An ``Amount`` that reaches a response (msgspec encodes Decimal, not its subclasses)."""
    if isinstance(value, Decimal):
        return Decimal(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


ENCODER = msgspec.json.Encoder(decimal_format="number", enc_hook=_encode_amount)
