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


class QuotaCreditOut(msgspec.Struct):
    """The credit as applied (a repeated order answers 409 with this same body)."""

    order_id: str
    user_id: str
    plan_code: str | None
    expires_at: str | None
    status: str
    credits: dict[str, Decimal]
    tx_id: str
    applied: bool


class WebhookOut(msgspec.Struct):
    """A processed payment notification."""

    status: str  # processed | duplicate
    event: str
    order_id: str | None = None
    refund_id: str | None = None


class MeterOut(msgspec.Struct):
    """One meter of a user: allowance, usage, credits and what remains."""

    limit: Decimal
    used: Decimal
    credits: Decimal
    remaining: Decimal
    period: str
    resets_at: str | None


class QuotaCheckOut(msgspec.Struct):
    """Seed 000 check, with per-meter detail."""

    remain_chat: Decimal
    remain_tpl: Decimal
    plan_code: str
    plan_status: str
    assigned_plan: str
    expires_at: str | None
    meters: dict[str, MeterOut]


class QuotaDebitOut(msgspec.Struct):
    """The result of an accepted debit."""

    tx_id: str
    meter: str
    remaining: Decimal
    from_allowance: Decimal
    from_credits: Decimal
    plan_code: str


class BalanceCheckOut(msgspec.Struct):
    """Seed 002 pre-check answer; resets_at: when the balance meter's allowance renews."""

    allowed: bool
    balance: Decimal
    resets_at: str | None = None


class BalanceDebitOut(msgspec.Struct):
    """Seed 002 debit answer."""

    balance: Decimal
    tx_id: str


class PlanStateOut(msgspec.Struct):
    """A user's plan as the balance answer shows it."""

    plan_code: str
    expires_at: str | None
    status: str


class BalanceOut(msgspec.Struct):
    """Seed 002 balance answer."""

    balance: Decimal
    plan: PlanStateOut
    resets_at: str | None


class PlanApplyOut(msgspec.Struct):
    """The plan now assigned to the user."""

    user_id: str
    plan_code: str
    expires_at: str | None
    status: str
    tx_id: str
    applied: bool


class PlanMeterOut(msgspec.Struct):
    """A meter of a plan: its allowance per period ('none': never renews)."""

    limit: Decimal
    period: str


class PlanOut(msgspec.Struct):
    """A plan of the catalog; version and updated_by as the last change left them."""

    plan_code: str
    meters: dict[str, PlanMeterOut]
    duration_days: int | None
    price: str
    currency: str
    version: int
    updated_by: str


class PlansOut(msgspec.Struct):
    """The plan catalog."""

    plans: list[PlanOut]


class TransactionOut(msgspec.Struct):
    """One ledger row: amounts signed (debits negative), split between allowance and credits."""

    tx_id: str
    kind: str
    meter: str
    amount: Decimal
    from_allowance: Decimal
    from_credits: Decimal
    period: str
    ref: str | None
    reason: str | None
    caller: str
    action: str | None
    plan_code: str | None
    occurred_at: str


class TransactionsOut(msgspec.Struct):
    """A page of a user's ledger, newest first; pass next_before to get the next page."""

    transactions: list[TransactionOut]
    next_before: str | None


class ErrorBody(msgspec.Struct):
    """Every error: a machine code, a message, and the offending field if any."""

    code: str
    message: str
    field: str | None = None


class ErrorOut(msgspec.Struct):
    """The envelope of every error answer."""

    error: ErrorBody


class HealthOut(msgspec.Struct):
    """Liveness: the process answers (it says nothing of Redis or PostgreSQL)."""

    status: str
    service: str
    version: str


class ReadyOut(msgspec.Struct):
    """Readiness: ``ready`` (200) when every check is ``ok``, else ``unavailable`` (503), the
    failing checks saying why (``redis``, ``postgres``: a schema behind the build's
    is a PostgreSQL failure that names the migration to run). ``ledger`` says ``lagging: ...``
    (still 200) when the oldest unflushed entry is older than FLUSH_LAG_ALERT_SECONDS, and
    ``full: ...`` (503) when shard streams are at their backlog limit."""

    status: str
    checks: dict[str, str]


class QuotaDebitErrorOut(msgspec.Struct):
    """A refused seed 000 debit: 409 duplicate ref (the original tx_id and what it left),
    403 insufficient quota (what remains)."""

    error: ErrorBody
    tx_id: str | None = None
    remaining: Decimal | None = None


class BalanceDebitErrorOut(msgspec.Struct):
    """A refused seed 002 debit: 409 duplicate ref (the original tx_id and balance), 403
    insufficient balance."""

    error: ErrorBody
    tx_id: str | None = None
    balance: Decimal | None = None


class CreditConflictOut(QuotaCreditOut):
    """409 duplicate order: the original credit, as it was answered, with the error."""

    error: ErrorBody


class VersionConflictOut(msgspec.Struct):
    """409: the plan changed since the version the PUT names; its current version."""

    error: ErrorBody
    version: int


class WebhookErrorOut(msgspec.Struct):
    """A notification not processed: a verified one is kept whole as a dead letter (its
    id) for finance; one that failed verification is recorded (its id; none past the
    rate limit)."""

    error: ErrorBody
    dead_letter_id: int | None = None
    rejection_id: int | None = None


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
