"""The payment webhook: verify, process once, and keep whatever cannot be processed.

A verified notification that cannot be processed is stored whole in ``dead_letters`` and
answered 4xx with its ``dead_letter_id``; one that fails verification is only recorded
(sender, reason, size, body hash; bounded and rate-limited) in ``webhook_rejections`` and
answered 401/403 with its ``rejection_id``, so forged posts cannot fill PostgreSQL. A
failure of our PostgreSQL (or of the provider's API) answers 503 so the sender retries.
Verifiers: ``payments.verifiers``; the format: ``payments.notifications``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from core import metrics
from core.errors import NotFound, OrderReused, QuotaError, Rejected
from core.ids import user_id_problem
from payments.credits import BalanceLimit, CreditOrder, Payments
from payments.notifications import (
    EVENTS,
    known_event,
    parse_event,
    parse_object,
    text_field,
    units_field,
)
from payments.verifiers import Verifier

log = logging.getLogger("quota_gateway.webhook")

#: Headers never stored with a dead letter.
SECRET_HEADERS = frozenset({"authorization", "x-internal-key", "cookie", "proxy-authorization"})
#: Records kept of notifications that failed verification (sender, reason, size, body
#: hash; never the body): the newest this many per sender, and in all.
REJECTIONS_PER_SENDER = 100
REJECTIONS_MAX = 10_000
#: How many such records one process writes: a sustained rate per second and a burst.
#: Past it a refusal is only counted (quota_webhook_rejections_total{kept="false"}).
REJECTIONS_PER_SECOND = 20.0
REJECTIONS_BURST = 100
#: The statuses of a refusal by the verifier: the sender is not who it claims to be.
UNVERIFIED = (401, 403)


class RateLimit:
    """A token bucket: ``take`` is True while the rate (and burst) allow one more."""

    def __init__(self, per_second: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        """Spend a token if one is left."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(frozen=True, slots=True)
class Outcome:
    """What processing a notification did."""

    status: str  # processed | duplicate
    event: str
    order_id: str | None = None
    refund_id: str | None = None


class PaymentWebhook:
    """Verify, process once, or keep as a dead letter."""

    def __init__(self, payments: Payments, verifier: Verifier, *,
                 per_sender: int = REJECTIONS_PER_SENDER, max_kept: int = REJECTIONS_MAX,
                 rate: RateLimit | None = None) -> None:
        self.payments = payments
        self.verifier = verifier
        self.db = payments.engine.db
        self.per_sender = per_sender
        self.max_kept = max_kept
        self.rate = rate or RateLimit(REJECTIONS_PER_SECOND, REJECTIONS_BURST)

    async def handle(self, body: bytes, headers: Mapping[str, str], sender: str, *,
                     verify: bool = True, source: str = "webhook") -> Outcome:
        """Process one notification; Rejected means it was not (the caller stores it)."""
        if verify:
            note = await self.verifier.verify(body, headers, sender)
        else:
            note = parse_object(*parse_event(body))
        if note.status != EVENTS[note.event]:
            raise Rejected(422, "status_mismatch",
                           f"{note.event} for an object whose status is {note.status!r}",
                           field="object.status")
        if note.event == "refund.succeeded":
            refund = await self.payments.refunds.refund(
                note.object_id, note.payment_id, note.amount, note.currency, caller=source)
            return Outcome("duplicate" if refund.duplicate else "processed", note.event,
                           refund.order_id, refund.refund_id)
        metadata = note.metadata
        order_id = text_field(metadata.get("order_id") or note.payment_id,
                         "object.metadata.order_id")
        user_id = metadata.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            raise Rejected(422, "unknown_user", "the payment names no user",
                           field="object.metadata.user_id")
        problem = user_id_problem(user_id)
        if problem is not None:
            raise Rejected(422, "invalid_notification", problem, field="object.metadata.user_id")
        plan_code = metadata.get("plan_code")
        if note.event == "payment.canceled":
            new = await self.payments.cancel(order_id, note.payment_id, user_id,
                                             plan_code if isinstance(plan_code, str) else None,
                                             note.amount, note.currency, source)
            return Outcome("processed" if new else "duplicate", note.event, order_id)
        if not isinstance(plan_code, str) or not plan_code:
            raise Rejected(422, "unknown_plan", "the payment names no plan",
                           field="object.metadata.plan_code")
        meters = self.payments.engine.action_meters  # seed 000's two credit fields
        credit_fields = (meters.get("chat_tokens", "chat"), meters.get("tpl_run", "template"))
        credits = tuple(sorted(
            (meter, micro) for meter, micro in (
                (credit_fields[0], units_field(metadata, "units_chat")),
                (credit_fields[1], units_field(metadata, "units_tpl")))
            if micro > 0
        ))
        order = CreditOrder(order_id, user_id, plan_code, credits, note.amount, note.currency,
                            note.payment_id, source, source)
        try:
            result = await self.payments.credit(order)
        except NotFound as exc:
            raise Rejected(422, "unknown_plan", exc.message,
                           field="object.metadata.plan_code") from None
        except OrderReused as exc:
            raise Rejected(422, "order_reused", exc.message, field="object.id") from None
        except BalanceLimit as exc:
            name = "units_chat" if exc.meter == credit_fields[0] else "units_tpl"
            raise Rejected(422, "balance_limit", exc.message,
                           field=f"object.metadata.{name}") from None
        return Outcome("duplicate" if result.duplicate else "processed", note.event, order_id)

    async def receive(self, body: bytes, headers: Mapping[str, str], sender: str
                      ) -> tuple[Outcome | None, Rejected | None, dict[str, int | None]]:
        """The HTTP side: process; or keep a verified notification that cannot be processed
        as a dead letter, and record one that failed verification; say which."""
        try:
            outcome = await self.handle(body, headers, sender)
        except Rejected as exc:
            if exc.status in UNVERIFIED:
                return None, exc, {"rejection_id": await self.reject(body, sender, exc)}
            return None, exc, {"dead_letter_id": await self.store(body, headers, sender, exc)}
        metrics.WEBHOOKS.labels(outcome.event, outcome.status).inc()
        return outcome, None, {}

    async def reject(self, body: bytes, sender: str, exc: QuotaError) -> int | None:
        """Record a notification that failed verification (or was too large to verify):
        sender, reason, size and body hash, bounded per sender and in all, and at most
        ``rate`` records a second; its record's id, or None past the rate."""
        metrics.WEBHOOKS.labels(_event_of(body), "rejected").inc()
        kept = self.rate.take()
        metrics.WEBHOOK_REJECTIONS.labels(exc.code, "true" if kept else "false").inc()
        if not kept:
            return None
        reason = f"{exc.code}: {exc.message}" + (f" ({exc.field})" if exc.field else "")
        record: int = await self.db.fetchval(
            "insert_webhook_rejection", sender, reason, len(body),
            hashlib.sha256(body).digest(), self.per_sender, self.max_kept)
        return record

    async def replay(self, dead_letter_id: int, body: bytes | None = None, *,
                     verify: bool = True) -> Outcome:
        """Process a dead letter again (optionally with a fixed body); Rejected if it still
        cannot be. A processed one is marked replayed; processing is idempotent, so a
        second replay of a credited payment answers "duplicate"."""
        row = await self.db.fetchrow("get_dead_letter", dead_letter_id)
        if row is None:
            raise NotFound(f"no dead letter {dead_letter_id}", field="id")
        try:
            outcome = await self.handle(body if body is not None else bytes(row["body"]),
                                        row["headers"], row["sender"], verify=verify,
                                        source="replay")
        except Rejected as exc:
            await self.db.fetchval("record_replay_attempt", dead_letter_id,
                                   f"rejected again: {exc.code}: {exc.message}")
            raise
        await self.db.fetchval("mark_dead_letter_replayed", dead_letter_id,
                               f"{outcome.status}: {outcome.event} {outcome.order_id or ''}"
                               .strip())
        metrics.WEBHOOKS.labels(outcome.event, f"replay_{outcome.status}").inc()
        return outcome

    async def store(self, body: bytes, headers: Mapping[str, str], sender: str,
                    exc: QuotaError) -> int:
        """Keep a notification whole (secrets in headers left out); its dead-letter id."""
        kept = {k.lower(): v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}
        reason = f"{exc.code}: {exc.message}" + (f" ({exc.field})" if exc.field else "")
        dead_letter: int = await self.db.fetchval("insert_dead_letter", "webhook", sender,
                                                  kept, body, reason)
        metrics.DEAD_LETTERS.labels(exc.code).inc()
        metrics.WEBHOOKS.labels(_event_of(body), "dead_letter").inc()
        log.warning("payment notification kept as dead letter %d: %s", dead_letter, reason)
        return dead_letter


def _event_of(body: bytes) -> str:
    """The event named in a body, for the metric label only (bounded to known events)."""
    try:
        event = orjson.loads(body).get("event")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return known_event(event) or "unknown"
