"""The handlers: parse, validate, call the engine (or payments), answer.

Each handler takes the request and the authenticated caller; ``hotpath.routes`` declares
which route runs which handler with what scope, and ``hotpath.routing`` wraps them all the
same way (authentication, error envelope, timing).
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from core import metrics
from core.amounts import from_micro
from core.clock import from_ms, to_ms
from core.errors import (
    BacklogFull,
    DependencyUnavailable,
    DuplicateOrder,
    DuplicateRef,
    HoldClosed,
    InsufficientQuota,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RefReused,
    TooManyHolds,
)
from core.ids import user_id_problem
from core.settings import Caller, Settings
from hotpath.responses import json_response
from hotpath.results import (
    BalanceCheckOut,
    BalanceDebitOut,
    BalanceOut,
    ExtendOut,
    HealthOut,
    MeterOut,
    PlanApplyOut,
    PlanStateOut,
    QuotaCheckOut,
    QuotaCreditOut,
    QuotaDebitOut,
    ReadyOut,
    ReleaseOut,
    ReserveOut,
    SettleOut,
    TransactionOut,
    TransactionsOut,
    WebhookOut,
)
from hotpath.routing import read_body, read_json_body
from hotpath.schemas import (
    DEFAULT_PAGE,
    MAX_PAGE,
    BalanceCheckIn,
    BalanceDebitIn,
    ExtendIn,
    PlanApplyIn,
    QuotaCreditIn,
    QuotaDebitIn,
    ReleaseIn,
    ReserveIn,
    SettleIn,
    decode,
    micro,
    money,
)
from lua.replies import CheckReply, DebitReply, MeterView, Status
from payments.credits import BalanceLimit, CreditOrder, Payments
from payments.verifiers import Verifier, make_verifier
from payments.webhook import PaymentWebhook
from persistence.plans import PlanBody, list_plans, validate_plan
from quota.engine import Engine
from quota.holds import Closed

#: The latest plan expiry taken (its time must stay a datetime in every time zone).
MAX_EXPIRES_AT = datetime(9000, 1, 1, tzinfo=UTC)


def signed_micro(micro: int) -> Decimal:
    """A signed amount in micro-units as an exact Decimal."""
    return -from_micro(-micro) if micro < 0 else from_micro(micro)


def _parse_cursor(cursor: str | None) -> tuple[datetime | None, uuid.UUID | None]:
    """``before`` as handed out in next_before: ``<epoch ms>_<tx id>``."""
    if not cursor:
        return None, None
    ms, _, tx = cursor.partition("_")
    try:
        return from_ms(int(ms)), uuid.UUID(tx)
    except (ValueError, OverflowError):  # not a number, not a UUID, beyond datetime's years
        raise InvalidInput("must be a next_before value from a previous page",
                           field="before") from None


def _check_user_id(user_id: str | None, field: str = "user_id") -> str:
    problem = user_id_problem(user_id)
    if problem is not None:
        raise InvalidInput(problem, field=field)
    assert user_id is not None
    return user_id


class Api:
    """The handlers, bound to one engine (and the payments and webhook around it)."""

    def __init__(self, settings: Settings, engine: Engine,
                 verifier: Verifier | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.payments = Payments(engine)
        self.webhook = PaymentWebhook(self.payments, verifier or make_verifier(settings))
        self.calendar = engine.calendar
        self.chat_meter = engine.action_meters.get("chat_tokens", "chat")
        self.tpl_meter = engine.action_meters.get("tpl_run", "template")
        self._debit_counters: dict[tuple[str, Status], Any] = {}

    async def body(self, request: Request) -> bytes:
        """The raw JSON body, within the size limit."""
        return await read_json_body(request, self.settings.max_body_bytes)

    def _iso(self, ms: int) -> str | None:
        return self.calendar.iso(ms) if ms else None

    def _meter_out(self, view: MeterView) -> MeterOut:
        return MeterOut(
            limit=from_micro(view.limit), used=from_micro(view.used),
            credits=from_micro(view.credits), remaining=from_micro(view.remaining),
            period={"d": "day", "m": "month", "c": "cycle"}.get(view.period, "none"),
            resets_at=self._iso(view.period_end_ms), held=from_micro(view.held),
        )

    def _debit_outcome(self, meter: str, reply: DebitReply, balance_field: str) -> None:
        """Raise the error a non-OK debit reply means; count every outcome."""
        counter = self._debit_counters.get((meter, reply.status))
        if counter is None:  # labels() cost as much as the inc: once a (meter, status)
            counter = self._debit_counters[(meter, reply.status)] = metrics.DEBITS.labels(
                meter, reply.status.name.lower())
        counter.inc()
        if reply.status is Status.OK:
            return
        if reply.status is Status.DUPLICATE:
            raise DuplicateRef(
                "this ref was already debited; the original transaction stands",
                field="ref",
                extra={"tx_id": reply.tx_id, balance_field: from_micro(reply.remaining)},
            )
        if reply.status is Status.REF_REUSED:
            raise RefReused("this ref was already used with another amount, meter or reason")
        if reply.status is Status.INSUFFICIENT:
            raise InsufficientQuota(
                f"not enough {meter} quota", field="units",
                extra={balance_field: from_micro(reply.remaining)},
            )
        if reply.status is Status.BACKLOG:
            metrics.BACKLOG_REFUSALS.inc()
            raise BacklogFull("the ledger backlog is over its limit; retry later")
        raise DependencyUnavailable("redis", f"unexpected debit status {reply.status.name}")

    # -- seed 000: quota API ---------------------------------------------------------------
    async def quota_check(self, request: Request, caller: Caller | None) -> Response:
        user_id = _check_user_id(request.path_params["user_id"])
        reply = await self.engine.check(user_id)
        meters = {v.meter: self._meter_out(v) for v in reply.meters}
        return json_response(self._quota_check_out(reply, meters))

    def _quota_check_out(self, reply: CheckReply, meters: dict[str, MeterOut]) -> QuotaCheckOut:
        remain = {v.meter: v.remaining for v in reply.meters}
        return QuotaCheckOut(
            remain_chat=from_micro(remain.get(self.chat_meter, 0)),
            remain_tpl=from_micro(remain.get(self.tpl_meter, 0)),
            plan_code=reply.plan_code, plan_status=reply.plan_status,
            assigned_plan=reply.assigned_plan, expires_at=self._iso(reply.expires_ms),
            meters=meters,
        )

    async def quota_debit(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), QuotaDebitIn)
        return json_response(await self.debit_action(body, caller))

    async def debit_action(self, body: QuotaDebitIn, caller: Caller) -> QuotaDebitOut:
        """One seed-000 debit; the error a refusal means is raised (and counted)."""
        meter = self.engine.action_meters.get(body.action)
        if meter is None:
            known = ", ".join(sorted(self.engine.action_meters))
            raise InvalidInput(f"unknown action; known actions: {known}", field="action")
        amount = micro(body.units, "units")
        reply = await self.engine.debit(body.user_id, meter, amount, body.ref,
                                        caller=caller.name, action=body.action)
        self._debit_outcome(meter, reply, "remaining")
        return QuotaDebitOut(
            tx_id=reply.tx_id, meter=meter, remaining=from_micro(reply.remaining),
            from_allowance=from_micro(reply.from_allowance),
            from_credits=from_micro(reply.from_credits),
            plan_code=reply.plan_code,
        )

    async def quota_debit_batch(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        from hotpath.batch import BatchIn, debit_items

        batch = decode(await self.body(request), BatchIn)
        return json_response(await debit_items(self, batch.items, caller,
                                               self.settings.batch_max_items))

    # -- holds -----------------------------------------------------------------------------
    def _ttl_ms(self, ttl_s: float | None) -> int:
        """A hold's ttl_s in whole ms, within HOLD_MAX_TTL_SECONDS (none: the default)."""
        most = self.settings.hold_max_ttl_seconds
        if ttl_s is None:
            return self.settings.hold_default_ttl_seconds * 1000
        ms = round(ttl_s * 1000)
        if not 1 <= ms <= most * 1000:
            raise InvalidInput(f"must be from 0.001 to {most} seconds (HOLD_MAX_TTL_SECONDS)",
                               field="ttl_s")
        return ms

    async def quota_reserve(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), ReserveIn)
        if (body.action is None) == (body.meter is None):
            raise InvalidInput("give either action or meter (one of them)", field="action")
        meter = body.meter
        if body.action is not None:
            meter = self.engine.action_meters.get(body.action)
            if meter is None:
                known = ", ".join(sorted(self.engine.action_meters))
                raise InvalidInput(f"unknown action; known actions: {known}", field="action")
        assert meter is not None
        units = micro(body.units, "units")
        ttl_ms = self._ttl_ms(body.ttl_s)
        held = await self.engine.holds.reserve(
            body.user_id, meter, units, body.ref, ttl_ms, reason=body.reason,
            caller=caller.name, action=body.action or "")
        if held.status is Status.DUPLICATE:
            raise DuplicateRef("this ref already reserved; the original hold stands",
                               field="ref", extra={"hold_id": held.hold_id,
                                                   "remaining": from_micro(held.remaining)})
        if held.status is Status.REF_REUSED:
            raise RefReused("this ref was already used with another amount, meter or reason")
        if held.status is Status.INSUFFICIENT:
            raise InsufficientQuota(f"not enough {meter} quota to hold", field="units",
                                    extra={"remaining": from_micro(held.remaining)})
        if held.status is Status.TOO_MANY_HOLDS:
            raise TooManyHolds(f"the user has {held.open_holds} open holds, the most "
                               "HOLD_MAX_OPEN allows; settle or release one first",
                               field="user_id")
        if held.status is Status.BACKLOG:
            metrics.BACKLOG_REFUSALS.inc()
            raise BacklogFull("the ledger backlog is over its limit; retry later")
        if held.status is not Status.OK:
            raise DependencyUnavailable("redis", f"unexpected reserve status {held.status}")
        return json_response(ReserveOut(
            hold_id=held.hold_id, user_id=body.user_id, meter=meter,
            units=from_micro(units), expires_at=self._iso(held.expires_ms),
            remaining=from_micro(held.remaining), plan_code=held.plan_code))

    @staticmethod
    def _closed_refusal(done: Closed, hold_id: str) -> None:
        """Raise what a settle's or release's refusal means."""
        if done.status is Status.HOLD_GONE:
            if done.state == "unknown":
                missing = NotFound("no such hold (or its user's ledger does not know it)",
                                   field="hold_id")
                missing.code = "hold_not_found"
                raise missing
            raise HoldClosed(done.state, hold_id)
        if done.status is Status.INSUFFICIENT:
            raise InsufficientQuota(
                "the settle takes more than the hold, what is free and the plan's overdraft "
                "allow; nothing was debited (partial: true takes what is available)",
                field="units", extra={"hold_id": hold_id,
                                      "available": from_micro(done.available)})
        raise DependencyUnavailable("redis", f"unexpected hold status {done.status}")

    async def quota_settle(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), SettleIn)
        units = micro(body.units, "units", allow_zero=True)
        done = await self.engine.holds.close(body.hold_id, "settle", units,
                                             partial=body.partial, caller=caller.name)
        if done.status not in (Status.OK, Status.DUPLICATE):
            self._closed_refusal(done, body.hold_id)
        return json_response(SettleOut(
            hold_id=body.hold_id, tx_id=done.tx_id, settled=from_micro(done.settled),
            from_allowance=from_micro(done.from_allowance),
            from_credits=from_micro(done.from_credits), released=from_micro(done.released),
            remaining=from_micro(done.remaining)))

    async def quota_release(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), ReleaseIn)
        done = await self.engine.holds.close(body.hold_id, "release", caller=caller.name)
        if done.status not in (Status.OK, Status.DUPLICATE):
            self._closed_refusal(done, body.hold_id)
        return json_response(ReleaseOut(hold_id=body.hold_id,
                                        released=from_micro(done.released),
                                        remaining=from_micro(done.remaining)))

    async def quota_extend(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), ExtendIn)
        ttl_ms = self._ttl_ms(body.ttl_s)
        done = await self.engine.holds.extend(body.hold_id, ttl_ms, caller=caller.name)
        if done.status is not Status.OK:
            self._closed_refusal(Closed(done.status, state=done.state), body.hold_id)
        return json_response(ExtendOut(hold_id=body.hold_id,
                                       expires_at=self._iso(done.expires_ms)))

    async def quota_credit(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), QuotaCreditIn)
        credits = sorted(
            (meter, micro(units, name, allow_zero=True))
            for meter, units, name in ((self.chat_meter, body.units_chat, "units_chat"),
                                       (self.tpl_meter, body.units_tpl, "units_tpl"))
        )
        paid = money(body.amount, "amount") if body.amount is not None else None
        order = CreditOrder(body.order_id, body.user_id, body.plan_code,
                            tuple(c for c in credits if c[1] > 0), paid, body.currency,
                            source="api", caller=caller.name)
        try:
            result = await self.payments.credit(order)
        except BalanceLimit as exc:
            exc.field = "units_chat" if exc.meter == self.chat_meter else "units_tpl"
            raise
        expired = 0 < result.expires_ms <= self.engine.clock.now_ms()
        out = QuotaCreditOut(
            order_id=result.order_id, user_id=result.user_id, plan_code=result.plan_code,
            expires_at=self._iso(result.expires_ms), status="expired" if expired else "active",
            credits={m: from_micro(v) for m, v in result.credits.items()},
            tx_id=result.tx_id, applied=result.applied,
        )
        if result.duplicate:
            raise DuplicateOrder("this order was already credited; the original credit stands",
                                 field="order_id", extra=msgspec.structs.asdict(out))
        return json_response(out)

    async def payment_webhook(self, request: Request, caller: Caller | None) -> Response:
        sender = request.client.host if request.client else ""
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except PayloadTooLarge as exc:  # too large to verify: recorded, not kept
            kept = exc.extra if isinstance(exc.extra, bytes) else b""
            exc.extra = {"rejection_id": await self.webhook.reject(kept, sender, exc)}
            raise
        outcome, rejected, record = await self.webhook.receive(body, request.headers, sender)
        if rejected is not None:
            rejected.extra = record
            raise rejected
        assert outcome is not None
        return json_response(WebhookOut(outcome.status, outcome.event, outcome.order_id,
                                        outcome.refund_id))

    # -- seed 002: balance API -------------------------------------------------------------
    async def balance_check(self, request: Request, caller: Caller | None) -> Response:
        body = decode(await self.body(request), BalanceCheckIn)
        amount = micro(body.units, "units")
        reply = await self.engine.check(body.user_id, [self.settings.balance_meter])
        view = reply.meters[0]
        return json_response(BalanceCheckOut(allowed=amount <= view.remaining,
                                             balance=from_micro(view.remaining),
                                             resets_at=self._iso(view.period_end_ms)))

    async def balance_debit(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), BalanceDebitIn)
        amount = micro(body.units, "units")
        meter = self.settings.balance_meter
        reply = await self.engine.debit(body.user_id, meter, amount, body.ref,
                                        reason=body.reason, caller=caller.name)
        self._debit_outcome(meter, reply, "balance")
        return json_response(BalanceDebitOut(balance=from_micro(reply.remaining),
                                             tx_id=reply.tx_id))

    async def balance(self, request: Request, caller: Caller | None) -> Response:
        user_id = _check_user_id(request.query_params.get("user_id"))
        reply = await self.engine.check(user_id, [self.settings.balance_meter])
        view = reply.meters[0]
        return json_response(BalanceOut(
            balance=from_micro(view.remaining),
            plan=PlanStateOut(reply.assigned_plan, self._iso(reply.expires_ms),
                              reply.plan_status),
            resets_at=self._iso(view.period_end_ms),
        ))

    # -- plans -----------------------------------------------------------------------------
    async def plans_list(self, request: Request, caller: Caller | None) -> Response:
        plans = await list_plans(self.engine.db)
        return json_response({"plans": [p.to_json() for p in plans]})

    async def plan_get(self, request: Request, caller: Caller | None) -> Response:
        code = request.path_params["plan_code"]
        for plan in await list_plans(self.engine.db):
            if plan.plan_code == code:
                return json_response(plan.to_json())
        raise NotFound(f"unknown plan {code!r}", field="plan_code")

    async def plan_put(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        code = request.path_params["plan_code"]
        body = decode(await self.body(request), PlanBody)
        plan = validate_plan(code, body)
        stored = await self.engine.plans.put_and_sync(plan, caller.name,
                                                     from_version=body.version)
        return json_response(stored.to_json())

    async def plan_apply(self, request: Request, caller: Caller | None) -> Response:
        assert caller is not None
        body = decode(await self.body(request), PlanApplyIn)
        expires_ms = None
        if body.expires_at is not None:
            if body.expires_at.tzinfo is None:
                raise InvalidInput("must carry a time zone, e.g. 2026-12-31T00:00:00Z",
                                   field="expires_at")
            if body.expires_at >= MAX_EXPIRES_AT:  # compared aware: no conversion to overflow
                raise InvalidInput(f"must be before {MAX_EXPIRES_AT.isoformat()}",
                                   field="expires_at")
            expires_ms = to_ms(body.expires_at)
            if expires_ms <= self.engine.clock.now_ms():
                raise InvalidInput("must be in the future", field="expires_at")
        done = await self.engine.plans.apply(body.user_id, body.plan_code, expires_ms,
                                            caller.name)
        return json_response(PlanApplyOut(
            user_id=done.user_id, plan_code=done.plan_code,
            expires_at=self._iso(done.expires_ms), status="active", tx_id=done.tx_id,
            applied=done.applied_in_redis,
        ))

    async def transactions(self, request: Request, caller: Caller | None) -> Response:
        params = request.query_params
        user_id = _check_user_id(params.get("user_id"))
        raw_limit = params.get("limit", str(DEFAULT_PAGE))
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
            raise InvalidInput(f"must be an integer from 1 to {MAX_PAGE}", field="limit")
        before_at, before_tx = _parse_cursor(params.get("before"))
        rows = await self.engine.db.fetch("user_transactions", user_id, before_at, before_tx,
                                          int(raw_limit), self.settings.timezone)
        items = [TransactionOut(
            tx_id=str(r["tx_id"]), kind=r["kind"], meter=r["meter"],
            amount=signed_micro(r["amount_micro"]),
            from_allowance=from_micro(r["from_allowance_micro"]),
            from_credits=from_micro(r["from_credits_micro"]), period=r["period_id"],
            ref=r["ref"], reason=r["reason"], caller=r["caller"], action=r["action"],
            plan_code=r["plan_code"], occurred_at=r["occurred_at"].isoformat(),
            events=r["events"], rolled_up=r["rolled_up"],
        ) for r in rows]
        cursor = None
        if len(rows) == int(raw_limit):
            last = rows[-1]
            cursor = f"{to_ms(last['occurred_at'])}_{last['tx_id']}"
        return json_response(TransactionsOut(items, cursor))

    # -- operations ------------------------------------------------------------------------
    async def health(self, request: Request, caller: Caller | None) -> Response:
        return json_response(HealthOut("ok", self.settings.service_name,
                                       self.settings.service_version))

    async def ready(self, request: Request, caller: Caller | None) -> Response:
        checks = await self.engine.ready()
        # a lagging flush is said, not refused: debits are still served and recorded
        ok = all(v == "ok" or v.startswith("lagging:") for v in checks.values())
        return json_response(ReadyOut("ready" if ok else "unavailable", checks),
                             200 if ok else 503)

    async def metrics(self, request: Request, caller: Caller | None) -> Response:
        # The unflushed ledger as of this scrape, not of the last /ready: the alert rules
        # read these gauges. Redis unreachable: the values last seen (its errors are
        # counted where callers meet them).
        with contextlib.suppress(DependencyUnavailable):
            await self.engine.backlog()
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

