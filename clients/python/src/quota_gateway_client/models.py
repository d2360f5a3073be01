"""The results: small typed objects decoded straight from the service's JSON.

Every amount is a ``Decimal`` read from the JSON number's text (msgspec does this for
``Decimal`` fields): never through a float. Fields the service may add later are ignored,
and fields it may not send yet (``held``) default to ``None``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec


class Meter(msgspec.Struct):
    """One meter of a user: allowance, usage, credits, what remains and what is held."""

    limit: Decimal
    used: Decimal
    credits: Decimal
    remaining: Decimal
    period: str
    resets_at: str | None = None
    held: Decimal | None = None  # units reserved by open holds (newer services)


class QuotaCheck(msgspec.Struct):
    """``check``: what remains of chat and template quota, per meter in ``meters``."""

    remain_chat: Decimal
    remain_tpl: Decimal
    plan_code: str
    meters: dict[str, Meter] = {}
    plan_status: str | None = None
    assigned_plan: str | None = None
    expires_at: str | None = None


class DebitResult(msgspec.Struct):
    """``debit``: the transaction and what the meter has left.

    ``duplicate`` is true when the service had already debited this ``ref`` (a 409: the
    original debit stands and nothing more was taken); such an answer carries only the
    original ``tx_id`` and ``remaining``, so ``meter``, ``from_allowance``,
    ``from_credits`` and ``plan_code`` are then ``None``.
    """

    tx_id: str
    remaining: Decimal
    meter: str | None = None
    from_allowance: Decimal | None = None
    from_credits: Decimal | None = None
    plan_code: str | None = None
    ref: str = ""
    duplicate: bool = False


class BalanceDebitResult(msgspec.Struct):
    """``balance_debit`` (seed 002): the balance left and the transaction."""

    balance: Decimal
    tx_id: str
    ref: str = ""
    duplicate: bool = False


class BalanceCheck(msgspec.Struct):
    """``balance_check`` (seed 002): whether ``units`` would fit."""

    allowed: bool
    balance: Decimal
    resets_at: str | None = None


class PlanState(msgspec.Struct):
    """A user's plan as the balance answer shows it."""

    plan_code: str
    expires_at: str | None = None
    status: str | None = None


class Balance(msgspec.Struct):
    """``balance`` (seed 002): the balance meter and the plan."""

    balance: Decimal
    plan: PlanState
    resets_at: str | None = None


class CreditResult(msgspec.Struct):
    """``credit``: the plan applied and the credits added, once per order.

    ``duplicate`` is true when the order had been credited before: this is the original
    result, and nothing more was added.
    """

    order_id: str
    user_id: str
    tx_id: str
    credits: dict[str, Decimal] = {}
    plan_code: str | None = None
    expires_at: str | None = None
    status: str | None = None
    applied: bool = True
    duplicate: bool = False


class Transaction(msgspec.Struct):
    """One ledger row: amounts signed (debits negative)."""

    tx_id: str
    kind: str
    meter: str
    amount: Decimal
    occurred_at: str
    from_allowance: Decimal | None = None
    from_credits: Decimal | None = None
    period: str | None = None
    ref: str | None = None
    reason: str | None = None
    caller: str | None = None
    action: str | None = None
    plan_code: str | None = None


class TransactionsPage(msgspec.Struct):
    """``transactions``: a page of the ledger, newest first; ``next_before`` pages on."""

    transactions: list[Transaction]
    next_before: str | None = None


class Reservation(msgspec.Struct):
    """``reserve``: a hold on ``units`` of the action's meter until ``expires_at``.

    ``duplicate`` is true when the ref had already reserved: this is the original hold.
    """

    hold_id: str
    meter: str | None = None
    expires_at: str | None = None
    remaining: Decimal | None = None
    ref: str = ""
    duplicate: bool = False


class SettleResult(msgspec.Struct):
    """``settle``: what was debited (``settled``) and given back (``released``)."""

    hold_id: str
    tx_id: str | None = None
    settled: Decimal | None = None
    released: Decimal | None = None
    remaining: Decimal | None = None


class ReleaseResult(msgspec.Struct):
    """``release``: the hold's units given back."""

    hold_id: str
    released: Decimal | None = None
    remaining: Decimal | None = None


class ExtendResult(msgspec.Struct):
    """``extend``: the hold's new expiry."""

    hold_id: str
    expires_at: str | None = None


class BatchItemAnswer(msgspec.Struct):
    """One entry of a batch's answer, as sent: the status and the raw body."""

    status: int
    body: msgspec.Raw


class BatchAnswer(msgspec.Struct):
    """The batch answer: one entry per item, in order."""

    results: list[BatchItemAnswer]


def as_dict(result: msgspec.Struct) -> dict[str, Any]:
    """A result as a plain dict (amounts stay Decimals)."""
    return msgspec.structs.asdict(result)
