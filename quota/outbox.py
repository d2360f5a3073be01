"""The write-through outbox: changes committed in PostgreSQL first (plan assignments,
credits, refunds), then applied to Redis once per ``redis_outbox`` row.

A row whose Redis step failed stays pending, and the reconciler applies it later.
"""

from __future__ import annotations

import uuid
from typing import Any

from core import metrics
from core.clock import from_ms
from core.errors import DependencyUnavailable, InvariantBroken
from core.events import LedgerEvent, columns
from lua.replies import Status
from persistence.queries import QUERIES
from quota.loading import Loader
from quota.runtime import Runtime


class Outbox:
    """Applies committed write-through changes to Redis and marks them applied."""

    def __init__(self, rt: Runtime, loader: Loader) -> None:
        self.rt = rt
        self.loader = loader

    async def apply(
        self, outbox_id: int, user_id: str, op: str, payload: dict[str, Any], *, quiet: bool
    ) -> bool:
        """Apply one committed change ('plan', 'credit' or 'refund') to Redis and mark it
        applied.

        With ``quiet``, a Redis or PostgreSQL failure returns False: the change is durable
        in PostgreSQL and the reconciler applies it later.
        """
        rt = self.rt
        try:
            if op == "plan":
                await rt.scripts.set_plan(
                    rt.keys.user(user_id), plan_code=payload["plan_code"],
                    expires_ms=payload["expires_ms"], version=payload["version"],
                    start_ms=payload.get("start_ms", 0), state_ttl_ms=rt.state_ttl_ms)
            elif op in ("credit", "refund"):
                now_ms = rt.clock.now_ms()
                result, plan_code = await self.apply_payment(outbox_id, user_id, op, payload,
                                                             now_ms)
                if op == "refund":
                    await self._record_refund(outbox_id, user_id, payload, result, plan_code,
                                              now_ms)
                    return True
            else:
                raise InvariantBroken(f"unknown outbox operation {op!r}")
            async with rt.db.connection() as conn:
                await conn.execute(QUERIES["mark_outbox_applied"], outbox_id)
        except DependencyUnavailable:
            if not quiet:
                raise
            return False
        return True

    async def apply_payment(
        self, outbox_id: int, user_id: str, op: str, payload: dict[str, Any], now_ms: int
    ) -> tuple[dict[str, int], str]:
        """Run apply_payment.lua for a committed credit or refund: what it added or took,
        and the user's plan code in Redis. ``now_ms`` stamps a refund's ledger events.

        A refund needs the user's state in Redis (it takes back only what is left), so a
        "not loaded" answer loads the user and retries. A change applied before whose
        result Redis no longer knows (the user was reloaded) is read back from the ledger.
        """
        rt = self.rt
        plan = payload.get("plan") or {}
        keys = rt.keys
        for _ in range(rt.settings.load_retries + 1):
            reply = await rt.scripts.apply_payment(
                keys.user(user_id), keys.ledger(keys.shard(user_id)), op=op,
                outbox_id=outbox_id, plan_code=plan.get("plan_code", ""),
                expires_ms=plan.get("expires_ms", 0), plan_version=plan.get("version", 0),
                plan_start_ms=plan.get("start_ms", 0),
                state_ttl_ms=rt.state_ttl_ms, now=now_ms, caller=payload.get("caller", ""),
                ref=payload.get("refund_id") or payload["order_id"], user_id=user_id,
                credits=[(m, a, tx) for m, a, tx in payload["credits"]])
            if reply.status is not Status.NOT_LOADED:
                break
            await self.loader.load_user(user_id, rt.windows())
        else:
            raise DependencyUnavailable("redis", f"user {user_id!r} could not be loaded")
        if reply.status is Status.OK:
            for meter, _, _ in payload["credits"]:
                (metrics.CREDITS if op == "credit" else metrics.REFUNDS).labels(meter).inc()
        if reply.result in ("loaded", "deferred"):
            if op == "credit":
                return {m: amount for m, amount, _ in payload["credits"]}, reply.plan_code
            rows = await rt.db.fetch("refund_events", payload["refund_id"])
            return {r["meter"]: r["from_credits_micro"] for r in rows}, reply.plan_code
        pairs = (item.partition("=") for item in reply.result.split(",") if item)
        return {meter: int(amount) for meter, _, amount in pairs}, reply.plan_code

    async def _record_refund(self, outbox_id: int, user_id: str, payload: dict[str, Any],
                             taken: dict[str, int], plan_code: str, now_ms: int) -> None:
        """Write what a refund took back in Redis through to PostgreSQL, in one transaction:
        the refund's ``taken``, its ledger events and the outbox row's "applied" mark.

        The shard stream carries the same events (the same tx ids), which the flush then
        inserts no second time (both copies carry the same time and plan code). Written here,
        they do not depend on the stream: were Redis to lose it before the flush, the next
        load would otherwise give the refunded credits back (PostgreSQL's balance would not
        hold the refund, and the outbox row, already marked applied, would not be applied
        again).
        """
        now = from_ms(now_ms)
        shard = self.rt.keys.shard(user_id)
        events = [
            LedgerEvent(
                tx_id=uuid.UUID(tx), kind="refund", user_id=user_id, meter=meter,
                amount=-taken.get(meter, 0), from_allowance=0, from_credits=taken.get(meter, 0),
                period_id="n", ref=payload["refund_id"], reason=f"wanted={wanted}",
                caller=payload.get("caller", ""), action=None, plan_code=plan_code or None,
                occurred_at=now, shard=shard, stream_id=None,
            )
            for meter, wanted, tx in payload["credits"]
        ]
        async with self.rt.db.transaction() as conn:
            await conn.execute(QUERIES["set_refund_taken"], payload["refund_id"], taken)
            if events:
                await conn.fetchval(QUERIES["flush_events"], *columns(events))
            await conn.execute(QUERIES["mark_outbox_applied"], outbox_id)
