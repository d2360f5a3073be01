"""Refunds: take back the credits a refunded payment bought, in proportion to the amount.

Written through like a credit: one PostgreSQL transaction records the refund, what it
wants back per meter, the plan it ends (if the refund completes the payment) and a
``redis_outbox`` row; then ``apply_payment.lua`` takes back what is still there. Credits
already spent cannot be taken back: the shortfall stays visible in the refund's ``wanted``
and ``taken`` columns and in its ledger events.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from core.clock import from_ms, to_ms
from core.errors import Rejected
from persistence.queries import QUERIES
from quota.engine import Engine

CENTS = Decimal("0.01")


def fingerprint_of(*parts: object) -> str:
    """What makes a repeated order or refund "the same request"."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class RefundResult:
    """A refund: what it wanted back, what Redis could take (None until applied)."""

    refund_id: str
    order_id: str
    user_id: str
    wanted: dict[str, int]
    taken: dict[str, int] | None
    plan_revoked: bool
    duplicate: bool = False


def wanted_back(credits: dict[str, int], earlier: list[dict[str, int]], amount: Decimal,
                paid: Decimal, complete: bool) -> dict[str, int]:
    """Micro-units to take back per meter: the refunded share of each credit (exact integer
    arithmetic on cents and micro-units), or, for the refund that completes the payment,
    whatever the earlier refunds (``earlier``: their ``wanted``) did not take."""
    wanted = {}
    for meter, total in sorted(credits.items()):
        before = sum(int(w.get(meter, 0)) for w in earlier)
        if complete or paid == 0:
            wanted[meter] = total - before
        else:
            wanted[meter] = total * int(amount / CENTS) // int(paid / CENTS)
    return wanted


def _refundable(receipt: asyncpg.Record, payment_id: str, amount: Decimal, currency: str,
                earlier: list[asyncpg.Record]) -> bool:
    """Refuse a refund of a payment that did not succeed, in another currency, or beyond
    the paid amount; True when this refund completes the payment."""
    if receipt["status"] != "succeeded":
        raise Rejected(422, "payment_not_succeeded",
                       f"payment {payment_id!r} is {receipt['status']}",
                       field="object.payment_id")
    if currency != receipt["currency"]:
        raise Rejected(422, "currency_mismatch", "the refund's currency is not the payment's",
                       field="object.amount.currency")
    paid = Decimal(receipt["amount"])
    refunded = sum((Decimal(r["amount"]) for r in earlier), Decimal(0)) + amount
    if refunded > paid:
        raise Rejected(422, "refund_exceeds_payment",
                       f"refunds would total {refunded} of a {paid} payment",
                       field="object.amount.value")
    return refunded == paid


class Refunds:
    """The write-through side of refunds, bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def refund(self, refund_id: str, payment_id: str, amount: Decimal, currency: str,
                     caller: str) -> RefundResult:
        """Take back the credits of a refunded payment, in proportion to the amount; a
        repeat of the same refund returns the first result.

        A refund that completes the payment's amount takes back everything not taken yet
        and, if the user's plan is still the one the payment bought, ends that plan now.
        """
        engine = self.engine
        now_ms = engine.clock.now_ms()
        fingerprint = fingerprint_of(payment_id, amount.quantize(CENTS), currency)
        async with engine.db.transaction() as conn:
            await conn.execute(QUERIES["lock_order"], f"refund:{refund_id}")
            existing = await conn.fetchrow(QUERIES["get_refund"], refund_id)
            receipt = await conn.fetchrow(QUERIES["get_receipt_by_payment"], payment_id)
            if receipt is None:
                raise Rejected(422, "unknown_payment",
                               f"no succeeded payment {payment_id!r} to refund",
                               field="object.payment_id")
            if existing is not None:
                return self._repeated(existing, receipt, refund_id, payment_id, fingerprint)
            await conn.execute(QUERIES["lock_order"], receipt["order_id"])
            earlier = await conn.fetch(QUERIES["order_refunds"], receipt["order_id"])
            complete = _refundable(receipt, payment_id, amount, currency, earlier)
            credits = {m: int(v) for m, v in receipt["credits"].items()}
            wanted = wanted_back(credits, [r["wanted"] for r in earlier], amount,
                                 Decimal(receipt["amount"]), complete)
            user_id = receipt["user_id"]
            plan_payload = await self._end_plan(conn, receipt, complete, refund_id, caller,
                                                now_ms)
            payload = {"refund_id": refund_id, "order_id": receipt["order_id"],
                       "caller": caller, "plan": plan_payload,
                       "credits": [[m, w, engine.new_id(now_ms)] for m, w in wanted.items()
                                   if w > 0]}
            outbox_id = await conn.fetchval(QUERIES["insert_outbox"], user_id, "refund",
                                            payload)
            await conn.execute(QUERIES["insert_refund"], refund_id, receipt["order_id"],
                               str(amount), currency, wanted, plan_payload is not None,
                               outbox_id)
        if await self._credit_applied(receipt["outbox_id"]):
            await engine.outbox.apply(outbox_id, user_id, "refund", payload, quiet=True)
        stored = await engine.db.fetchrow("get_refund", refund_id)
        assert stored is not None
        return RefundResult(refund_id, receipt["order_id"], user_id, wanted, stored["taken"],
                            plan_payload is not None)

    async def _credit_applied(self, credit_outbox_id: int | None) -> bool:
        """Apply the payment's own credit first if it has not reached Redis yet (Redis
        blipped after its commit): a refund applied before it would take back only what
        Redis held without it, and the credit would then land in full. False when the
        credit is still pending: the refund then waits for the reconciler, which applies
        pending changes oldest first, the credit before its refunds."""
        if credit_outbox_id is None:
            return True
        row = await self.engine.db.fetchrow("pending_outbox_row", credit_outbox_id)
        if row is None:
            return True
        return await self.engine.outbox.apply(row["id"], row["user_id"], row["op"],
                                              row["payload"], quiet=True)

    @staticmethod
    def _repeated(existing: asyncpg.Record, receipt: asyncpg.Record, refund_id: str,
                  payment_id: str, fingerprint: str) -> RefundResult:
        """A refund id seen before: its first result, or 422 if the content differs."""
        same = fingerprint_of(payment_id, existing["amount"], existing["currency"])
        if existing["order_id"] != receipt["order_id"] or same != fingerprint:
            raise Rejected(422, "refund_reused",
                           f"refund {refund_id!r} was recorded with other content",
                           field="object.id")
        return RefundResult(refund_id, existing["order_id"], receipt["user_id"],
                            existing["wanted"], existing["taken"], existing["plan_revoked"],
                            duplicate=True)

    async def _end_plan(self, conn: asyncpg.Connection, receipt: asyncpg.Record,
                        complete: bool, refund_id: str, caller: str, now_ms: int
                        ) -> dict[str, Any] | None:
        """End the plan the payment bought, now, if it is still the user's (same version);
        the plan change for the outbox, or None when a later plan replaced it."""
        if not complete or receipt["plan_version"] is None:
            return None
        row = await conn.fetchrow(QUERIES["revoke_plan"], receipt["user_id"],
                                  receipt["plan_version"], from_ms(now_ms))
        if row is None:
            return None
        await conn.execute(QUERIES["insert_plan_event"], self.engine.new_id(now_ms),
                           receipt["user_id"], row["plan_code"], caller, f"refund {refund_id}",
                           from_ms(now_ms))
        return {"plan_code": row["plan_code"], "expires_ms": now_ms, "version": row["version"],
                "start_ms": to_ms(row["started_at"])}
