"""Payments: credits, plan purchases, cancellations and refunds, written through.

Money goes to PostgreSQL first. One transaction records the receipt (unique order id),
the plan assignment, the credit ledger events, the credit balances and a ``redis_outbox``
row; then ``apply_payment.lua`` applies that row in Redis, at most once per row. A row
committed but not applied (Redis down, a crash in between) is applied by the reconciler.

Refunds (``payments.refunds``) take back what a payment credited.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from core.amounts import MAX_BALANCE_MICRO, format_micro
from core.clock import from_ms
from core.errors import InvalidInput, NotFound, OrderReused, Rejected
from payments.refunds import CENTS, Refunds, fingerprint_of
from persistence.queries import QUERIES
from quota.engine import Engine


class BalanceLimit(InvalidInput):
    """A credit would take a user's balance of a meter over MAX_BALANCE_MICRO; nothing of
    the order is recorded. ``meter`` names the meter, ``held`` what the user holds."""

    def __init__(self, meter: str, held: int) -> None:
        super().__init__(
            f"the {meter} credit balance may hold at most {format_micro(MAX_BALANCE_MICRO)}"
            f" units; it holds {format_micro(held)}", field=meter, code="balance_limit")
        self.meter = meter


@dataclass(frozen=True, slots=True)
class CreditOrder:
    """One paid order: the plan it buys and the credits it adds (micro-units > 0)."""

    order_id: str
    user_id: str
    plan_code: str
    credits: tuple[tuple[str, int], ...] = ()
    amount: Decimal | None = None  # what was paid; None: the plan's price
    currency: str | None = None  # None: the plan's currency
    payment_id: str | None = None
    source: str = "api"
    caller: str = ""


@dataclass(frozen=True, slots=True)
class CreditResult:
    """A credit as recorded; ``duplicate`` when the order had been credited before."""

    order_id: str
    user_id: str
    plan_code: str | None
    expires_ms: int
    credits: dict[str, int]
    tx_id: str
    applied: bool
    duplicate: bool = False

    def to_json(self) -> dict[str, Any]:
        """The stored form (repeated to a retrying caller)."""
        return {"order_id": self.order_id, "user_id": self.user_id, "plan_code": self.plan_code,
                "expires_ms": self.expires_ms, "credits": self.credits, "tx_id": self.tx_id}

    @classmethod
    def from_json(cls, data: dict[str, Any], *, applied: bool, duplicate: bool) -> CreditResult:
        """A stored result, as answered again."""
        return cls(data["order_id"], data["user_id"], data["plan_code"], data["expires_ms"],
                   {m: int(v) for m, v in data["credits"].items()}, data["tx_id"], applied,
                   duplicate)


class Payments:
    """The write-through side of money, bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.refunds = Refunds(engine)

    # -- credits ---------------------------------------------------------------------------
    async def credit(self, order: CreditOrder) -> CreditResult:
        """Record and apply a paid order once; a repeat returns the first result.

        The plan bought replaces the user's plan, for its ``duration_days`` from now.
        Raises NotFound for an unknown plan, OrderReused when the order id (or the payment
        id) was already used for different content or paid by another payment.
        """
        engine = self.engine
        now_ms = engine.clock.now_ms()
        async with engine.db.transaction() as conn:
            await conn.execute(QUERIES["lock_order"], order.order_id)
            if order.payment_id:
                await conn.execute(QUERIES["lock_order"], f"payment:{order.payment_id}")
            plan = await conn.fetchrow(QUERIES["get_plan_row"], order.plan_code)
            if plan is None:
                raise NotFound(f"unknown plan {order.plan_code!r}", field="plan_code")
            amount = order.amount if order.amount is not None else Decimal(plan["price"])
            currency = order.currency or plan["currency"]
            fingerprint = fingerprint_of(order.user_id, order.plan_code, order.credits,
                                       amount.quantize(CENTS), currency)
            existing = await conn.fetchrow(QUERIES["get_receipt"], order.order_id)
            if existing is None and order.payment_id:
                existing = await conn.fetchrow(QUERIES["get_receipt_by_payment"],
                                               order.payment_id)
            if existing is not None:
                return await self._repeated(conn, existing, fingerprint, order.payment_id)

            expires_ms = now_ms + plan["duration_days"] * 86_400_000 if plan["duration_days"] \
                else 0
            row = await conn.fetchrow(QUERIES["set_user_plan"], order.user_id, order.plan_code,
                                      from_ms(expires_ms) if expires_ms else None,
                                      from_ms(now_ms))
            assert row is not None
            tx_id = engine.new_id(now_ms)
            occurred = from_ms(now_ms)
            await conn.execute(QUERIES["insert_plan_event"], tx_id, order.user_id,
                               order.plan_code, order.caller, f"order {order.order_id}",
                               occurred)
            triples: list[list[Any]] = []
            for meter, micro in order.credits:
                credit_tx = engine.new_id(now_ms)
                balance = await conn.fetchval(QUERIES["add_credit_balance"], order.user_id,
                                              meter, micro)
                if balance > MAX_BALANCE_MICRO:
                    raise BalanceLimit(meter, balance - micro)
                await conn.execute(QUERIES["insert_credit_event"], credit_tx, order.user_id,
                                   meter, micro, order.order_id, order.caller, order.plan_code,
                                   occurred)
                triples.append([meter, micro, credit_tx])
            payload = {
                "order_id": order.order_id, "caller": order.caller, "credits": triples,
                "plan": {"plan_code": order.plan_code, "expires_ms": expires_ms,
                         "version": row["version"], "start_ms": now_ms},
            }
            outbox_id = await conn.fetchval(QUERIES["insert_outbox"], order.user_id, "credit",
                                            payload)
            result = CreditResult(order.order_id, order.user_id, order.plan_code, expires_ms,
                                  dict(order.credits), str(tx_id), applied=False)
            await conn.execute(
                QUERIES["insert_receipt"], order.order_id, order.payment_id, order.user_id,
                order.plan_code, "succeeded", str(amount), currency, dict(order.credits),
                fingerprint, order.source, order.caller, row["expires_at"], row["version"],
                tx_id, outbox_id, result.to_json(), occurred,
            )
        applied = await engine.outbox.apply(outbox_id, order.user_id, "credit", payload,
                                            quiet=True)
        return CreditResult.from_json(result.to_json(), applied=applied, duplicate=False)

    async def _repeated(self, conn: asyncpg.Connection, existing: asyncpg.Record,
                        fingerprint: str, payment_id: str | None) -> CreditResult:
        paid_by = existing["payment_id"]
        if paid_by and payment_id and paid_by != payment_id:
            # The same order paid twice: credit once, and leave the second for finance.
            raise OrderReused(f"order {existing['order_id']!r} was already paid by "
                              f"payment {paid_by!r}")
        if existing["status"] != "succeeded":
            raise OrderReused(f"order {existing['order_id']!r} is recorded as "
                              f"{existing['status']}")
        if existing["fingerprint"] != fingerprint:
            raise OrderReused("this order was already credited with another user, plan, "
                              "credits or amount")
        if paid_by is None and payment_id:  # the provider's notice of an order Pay-svc sent
            other = await conn.fetchrow(QUERIES["get_receipt_by_payment"], payment_id)
            if other is not None:
                raise OrderReused(f"payment {payment_id!r} already paid order "
                                  f"{other['order_id']!r}")
            await conn.execute(QUERIES["attach_payment"], existing["order_id"], payment_id)
        applied = await conn.fetchval(QUERIES["outbox_applied"], existing["outbox_id"])
        return CreditResult.from_json(existing["result"], applied=bool(applied), duplicate=True)

    # -- cancellations ---------------------------------------------------------------------
    async def cancel(self, order_id: str, payment_id: str, user_id: str, plan_code: str | None,
                     amount: Decimal, currency: str, source: str) -> bool:
        """Record a canceled payment (nothing is credited). True when it was new."""
        async with self.engine.db.transaction() as conn:
            await conn.execute(QUERIES["lock_order"], order_id)
            await conn.execute(QUERIES["lock_order"], f"payment:{payment_id}")
            existing = await conn.fetchrow(QUERIES["get_receipt_by_payment"], payment_id) \
                or await conn.fetchrow(QUERIES["get_receipt"], order_id)
            if existing is not None:
                if existing["status"] == "canceled":
                    return False
                raise Rejected(409, "payment_already_succeeded",
                               f"payment {payment_id!r} was recorded as succeeded",
                               field="object.id")
            known = plan_code and await conn.fetchrow(QUERIES["get_plan_row"], plan_code)
            await conn.execute(
                QUERIES["insert_receipt"], order_id, payment_id, user_id,
                plan_code if known else None, "canceled", str(amount), currency, {},
                fingerprint_of(user_id, plan_code, amount, currency), source, "webhook", None,
                None, None, None, {}, from_ms(self.engine.clock.now_ms()),
            )
        return True
