"""The route table: every route declared once, the single source of the Starlette routes
and of the OpenAPI spec."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hotpath.routing import Operation, QueryParam
from hotpath.schemas import (
    DEFAULT_PAGE,
    MAX_PAGE,
    BalanceCheckIn,
    BalanceCheckOut,
    BalanceDebitErrorOut,
    BalanceDebitIn,
    BalanceDebitOut,
    BalanceOut,
    CreditConflictOut,
    HealthOut,
    PlanApplyIn,
    PlanApplyOut,
    PlanOut,
    PlansOut,
    QuotaCheckOut,
    QuotaCreditIn,
    QuotaCreditOut,
    QuotaDebitErrorOut,
    QuotaDebitIn,
    QuotaDebitOut,
    ReadyOut,
    TransactionsOut,
    VersionConflictOut,
    WebhookErrorOut,
    WebhookOut,
)
from persistence.plans import PlanBody

if TYPE_CHECKING:
    from hotpath.handlers import Api

Q, B = "/internal/billing/quota", "/internal/billing"
USER_QUERY = QueryParam("user_id", {"type": "string"}, required=True)


def operations(api: Api) -> list[Operation]:
    """Every route, bound to ``api``'s handlers."""
    return [*_quota(api), *_balance(api), *_plans(api), *_service(api)]


def _quota(api: Api) -> list[Operation]:
    """Seed 000's quota API and the payment webhook."""
    q, b = Q, B
    quota_refused = ((403, QuotaDebitErrorOut), (409, QuotaDebitErrorOut))
    return [
        Operation("GET", f"{q}/check/{{user_id}}", "quota_check",
                  "Remaining quota of every meter (seed 000)", "read", api.quota_check,
                  None, QuotaCheckOut, (401, 403, 422, 503)),
        Operation("POST", f"{q}/debit", "quota_debit",
                  "Debit an action's meter once per ref (seed 000)", "debit",
                  api.quota_debit, QuotaDebitIn, QuotaDebitOut,
                  (401, 403, 409, 413, 415, 422, 503), error_bodies=quota_refused),
        Operation("POST", f"{q}/credit", "quota_credit",
                  "Apply a paid plan and add credits, once per order_id (seed 000)",
                  "credit", api.quota_credit, QuotaCreditIn, QuotaCreditOut,
                  (401, 403, 404, 409, 413, 415, 422, 503),
                  error_bodies=((409, CreditConflictOut),)),
        Operation("POST", f"{b}/webhook/payment", "payment_webhook",
                  "Payment provider notification, verified by WEBHOOK_VERIFIER (no "
                  "X-Internal-Key); what fails is kept as a dead letter", None,
                  api.payment_webhook, None, WebhookOut, (401, 403, 409, 413, 422, 503),
                  error_bodies=tuple((st, WebhookErrorOut) for st in (401, 403, 409, 413,
                                                                       422))),
    ]


def _balance(api: Api) -> list[Operation]:
    """Seed 002's balance API and the ledger's transactions."""
    b, user_query = B, USER_QUERY
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
                  query=(user_query,)),
        Operation("GET", f"{b}/transactions", "transactions",
                  "A user's ledger from PostgreSQL, newest first, paginated", "read",
                  api.transactions, None, TransactionsOut, (401, 403, 422, 503),
                  query=(user_query,
                         QueryParam("limit", {"type": "integer", "minimum": 1,
                                              "maximum": MAX_PAGE,
                                              "default": DEFAULT_PAGE}),
                         QueryParam("before", {"type": "string"},
                                    description="next_before of the previous page"))),
    ]


def _plans(api: Api) -> list[Operation]:
    """The plan catalog and plan assignment."""
    b = B
    return [
        Operation("GET", f"{b}/plans", "plans_list", "The plan catalog", "read",
                  api.plans_list, None, PlansOut, (401, 403, 503)),
        Operation("GET", f"{b}/plans/{{plan_code}}", "plan_get", "One plan", "read",
                  api.plan_get, None, PlanOut, (401, 403, 404, 503)),
        Operation("PUT", f"{b}/plans/{{plan_code}}", "plan_put",
                  "Create or replace a plan (with version: only if it is still at it)",
                  "plans", api.plan_put, PlanBody, PlanOut,
                  (401, 403, 409, 413, 415, 422, 503),
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
        Operation("GET", "/metrics", "metrics", "Prometheus metrics", None, api.metrics),
        Operation("GET", "/openapi.json", "openapi", "This specification", None,
                  api.openapi),
    ]
