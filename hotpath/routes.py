"""The route table: every route declared once, the single source of the Starlette routes
and of the OpenAPI spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta

from core.settings import Caller
from hotpath.batch import BatchIn, BatchOut
from hotpath.openapi import build_spec
from hotpath.responses import json_response
from hotpath.results import (
    BalanceCheckOut,
    BalanceDebitErrorOut,
    BalanceDebitOut,
    BalanceOut,
    CreditConflictOut,
    ExtendOut,
    HealthOut,
    HoldErrorOut,
    PlanApplyOut,
    PlanOut,
    PlansOut,
    QuotaCheckOut,
    QuotaCreditOut,
    QuotaDebitErrorOut,
    QuotaDebitOut,
    ReadyOut,
    ReleaseOut,
    ReserveOut,
    SettleOut,
    TransactionsOut,
    VersionConflictOut,
    WebhookErrorOut,
    WebhookOut,
)
from hotpath.routing import Handler, Operation, Param
from hotpath.schemas import (
    DEFAULT_PAGE,
    MAX_PAGE,
    BalanceCheckIn,
    BalanceDebitIn,
    Cursor,
    ExtendIn,
    PaymentNotificationIn,
    PlanApplyIn,
    PlanCode,
    QuotaCreditIn,
    QuotaDebitIn,
    ReleaseIn,
    ReserveIn,
    SettleIn,
    UserId,
    UserIdInPath,
)
from persistence.plans import PlanBody

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from hotpath.handlers import Api

Q, B = "/internal/billing/quota", "/internal/billing"
USER_QUERY = Param("user_id", "query", UserId, required=True)
PLAN_PATH = Param("plan_code", "path", PlanCode)
PageSize = Annotated[int, Meta(ge=1, le=MAX_PAGE, extra_json_schema={"default": DEFAULT_PAGE})]


def operations(api: Api) -> list[Operation]:
    """Every route, bound to ``api``'s handlers."""
    return [*_quota(api), *_balance(api), *_plans(api), *_service(api)]


def _quota(api: Api) -> list[Operation]:
    """Seed 000's quota API and the payment webhook."""
    q, b = Q, B
    quota_refused = ((403, QuotaDebitErrorOut), (409, QuotaDebitErrorOut))
    hold_refused = ((403, HoldErrorOut), (409, HoldErrorOut))
    return [
        Operation("GET", f"{q}/check/{{user_id}}", "quota_check",
                  "Remaining quota of the user's meters (seed 000)", "read", api.quota_check,
                  None, QuotaCheckOut, (401, 403, 422, 503),
                  params=(Param("user_id", "path", UserIdInPath),)),
        Operation("POST", f"{q}/debit", "quota_debit",
                  "Debit an action's meter once per ref (seed 000)", "debit",
                  api.quota_debit, QuotaDebitIn, QuotaDebitOut,
                  (401, 403, 409, 413, 415, 422, 503), error_bodies=quota_refused),
        Operation("POST", f"{q}/debit/batch", "quota_debit_batch",
                  "Many debits in one request, each answered on its own (its status and "
                  "body as a single debit would be)", "debit", api.quota_debit_batch,
                  BatchIn, BatchOut, (401, 403, 413, 415, 422, 503)),
        Operation("POST", f"{q}/reserve", "quota_reserve",
                  "Hold an estimate of an action's (or a meter's) units until it is settled, "
                  "released or expires; once per ref", "debit", api.quota_reserve,
                  ReserveIn, ReserveOut, (401, 403, 409, 413, 415, 422, 503),
                  error_bodies=hold_refused),
        Operation("POST", f"{q}/settle", "quota_settle",
                  "Debit a hold's actual cost (beyond the estimate: from what is free, then "
                  "the plan's overdraft) and give back the rest; a repeat answers the same",
                  "debit", api.quota_settle, SettleIn, SettleOut,
                  (401, 403, 404, 409, 413, 415, 422, 503), error_bodies=hold_refused),
        Operation("POST", f"{q}/release", "quota_release",
                  "Give back all of a hold; a repeat answers the same", "debit",
                  api.quota_release, ReleaseIn, ReleaseOut,
                  (401, 403, 404, 409, 413, 415, 422, 503), error_bodies=hold_refused),
        Operation("POST", f"{q}/extend", "quota_extend",
                  "Keep a hold until ttl_s from now (never shorter; at most "
                  "HOLD_MAX_TTL_SECONDS)", "debit", api.quota_extend, ExtendIn, ExtendOut,
                  (401, 403, 404, 409, 413, 415, 422, 503), error_bodies=hold_refused),
        Operation("POST", f"{q}/credit", "quota_credit",
                  "Apply a paid plan and add credits, once per order_id (seed 000)",
                  "credit", api.quota_credit, QuotaCreditIn, QuotaCreditOut,
                  (401, 403, 404, 409, 413, 415, 422, 503),
                  error_bodies=((409, CreditConflictOut),)),
        Operation("POST", f"{b}/webhook/payment", "payment_webhook",
                  "Payment provider notification, verified by WEBHOOK_VERIFIER (no "
                  "X-Internal-Key); what fails is kept as a dead letter", None,
                  api.payment_webhook, PaymentNotificationIn, WebhookOut,
                  (401, 403, 409, 413, 422, 503),
                  params=(Param("X-Signature", "header", str,
                                description="The body's signature, base64 (needed with "
                                            "WEBHOOK_VERIFIER=signature)"),),
                  error_bodies=tuple((st, WebhookErrorOut) for st in (401, 403, 409, 413,
                                                                       422))),
    ]


def _balance(api: Api) -> list[Operation]:
    """Seed 002's balance API and the ledger's transactions."""
    b = B
    balance_refused = ((403, BalanceDebitErrorOut), (409, BalanceDebitErrorOut))
    return [
        Operation("POST", f"{b}/check", "balance_check",
                  "Would this many units be allowed? (seed 002)", "read",
                  api.balance_check, BalanceCheckIn, BalanceCheckOut,
                  (401, 403, 413, 415, 422, 503)),
        Operation("POST", f"{b}/debit", "balance_debit",
                  "Debit the balance once per ref (seed 002)", "debit", api.balance_debit,
                  BalanceDebitIn, BalanceDebitOut, (401, 403, 409, 413, 415, 422, 503),
                  error_bodies=balance_refused),
        Operation("GET", f"{b}/balance", "balance", "Balance and plan (seed 002)", "read",
                  api.balance, None, BalanceOut, (401, 403, 422, 503),
                  params=(USER_QUERY,)),
        Operation("GET", f"{b}/transactions", "transactions",
                  "A user's ledger from PostgreSQL, newest first, paginated", "read",
                  api.transactions, None, TransactionsOut, (401, 403, 422, 503),
                  params=(USER_QUERY, Param("limit", "query", PageSize),
                          Param("before", "query", Cursor))),
    ]


def _plans(api: Api) -> list[Operation]:
    """The plan catalog and plan assignment."""
    b = B
    return [
        Operation("GET", f"{b}/plans", "plans_list", "The plan catalog", "read",
                  api.plans_list, None, PlansOut, (401, 403, 503)),
        Operation("GET", f"{b}/plans/{{plan_code}}", "plan_get", "One plan", "read",
                  api.plan_get, None, PlanOut, (401, 403, 404, 503), params=(PLAN_PATH,)),
        Operation("PUT", f"{b}/plans/{{plan_code}}", "plan_put",
                  "Create or replace a plan (with version: only if it is still at it); a "
                  "plan_code in the body must be the path's",
                  "plans", api.plan_put, PlanBody, PlanOut,
                  (401, 403, 409, 413, 415, 422, 503), params=(PLAN_PATH,),
                  error_bodies=((409, VersionConflictOut),)),
        Operation("POST", f"{b}/plan/apply", "plan_apply", "Assign a plan to a user",
                  "plans", api.plan_apply, PlanApplyIn, PlanApplyOut,
                  (401, 403, 404, 413, 415, 422, 503)),
    ]


def _service(api: Api) -> list[Operation]:
    """Health, readiness, metrics and the spec."""
    return [
        Operation("GET", "/health", "health", "Liveness", None, api.health,
                  result=HealthOut),
        Operation("GET", "/ready", "ready",
                  "Readiness: a script by EVALSHA and a PostgreSQL query", None, api.ready,
                  result=ReadyOut, errors=(503,), error_bodies=((503, ReadyOut),)),
        Operation("GET", "/metrics", "metrics", "Prometheus metrics", None, api.metrics,
                  result=str, media_type="text/plain"),
        Operation("GET", "/openapi.json", "openapi", "This specification", None,
                  _spec(api), result=dict[str, Any]),
    ]


def _spec(api: Api) -> Handler:
    """The spec's handler: built from the settings, the route table and the engine's
    clock (the earliest expiry a request may set)."""
    async def openapi(request: Request, caller: Caller | None) -> Response:
        return json_response(build_spec(api.settings, operations(api),
                                        now_ms=api.engine.clock.now_ms()))

    return openapi
