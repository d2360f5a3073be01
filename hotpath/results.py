"""Response models: what each route answers, written by msgspec (amounts as exact JSON
numbers) and the source of the spec's response schemas."""

from __future__ import annotations

from decimal import Decimal

import msgspec


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
    held: Decimal = Decimal(0)  # units kept by open holds; remaining is what is left after


class QuotaCheckOut(msgspec.Struct):
    """Seed 000 check, with per-meter detail."""

    remain_chat: Decimal
    remain_tpl: Decimal
    plan_code: str
    plan_status: str
    assigned_plan: str
    expires_at: str | None
    #: chat, template, the balance meter and the actions' meters, then every other meter
    #: of the user's plan (in the plan's order)
    meters: dict[str, MeterOut]


class QuotaDebitOut(msgspec.Struct):
    """The result of an accepted debit."""

    tx_id: str
    meter: str
    remaining: Decimal
    from_allowance: Decimal
    from_credits: Decimal
    plan_code: str


class ReserveOut(msgspec.Struct):
    """A hold: its id (for settle, release, extend), what it keeps until when, and what is
    free after it. A repeated ref answers 409 with the original hold's id and remaining."""

    hold_id: str
    user_id: str
    meter: str
    units: Decimal
    expires_at: str | None
    remaining: Decimal
    plan_code: str


class SettleOut(msgspec.Struct):
    """A settled hold: what was debited (settled, split between allowance and credits),
    what was given back (released) and what is free now. A repeat answers the same."""

    hold_id: str
    tx_id: str
    settled: Decimal
    from_allowance: Decimal
    from_credits: Decimal
    released: Decimal
    remaining: Decimal


class ReleaseOut(msgspec.Struct):
    """A released hold: its units given back; what is free now."""

    hold_id: str
    released: Decimal
    remaining: Decimal


class ExtendOut(msgspec.Struct):
    """A hold's new expiry."""

    hold_id: str
    expires_at: str | None


class HoldErrorOut(msgspec.Struct):
    """A refused reserve or settle: 403 insufficient quota (``remaining``; a settle also
    ``available``, what it could take), 409 duplicate ref (the original ``hold_id``), 409
    ``hold_settled``/``hold_released``/``hold_expired``/``too_many_holds``."""

    error: ErrorBody
    hold_id: str | None = None
    remaining: Decimal | None = None
    available: Decimal | None = None


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
    overdraft: Decimal = Decimal(0)  # present when not 0


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
    """One ledger row: amounts signed (debits negative), split between allowance and credits.

    A row ``rolled_up`` is the daily total of ``events`` rows pruned past the ledger's
    retention (one per day, meter, kind, plan and period, at the day's start in TIMEZONE);
    its ``tx_id`` names it for the page cursor, it is no transaction's.
    """

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
    events: int = 1
    rolled_up: bool = False


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
    ``full: ...`` (503) when shard streams are at their backlog limit. On a Redis Cluster
    each primary of the slot table has a check of its own, ``redis@HOST:PORT`` (``ok``, or
    why it does not serve: unreachable, or back with older data and rebuilding), and
    ``redis`` names the first node that fails."""

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
