"""A refund that arrives while its payment's credit has not reached Redis yet (Redis blipped
after the credit's commit) takes back what the refund wants, not only what Redis held
without the credit (issue #17, defect 4): the credit is applied first, or the refund waits
for the reconciler, which applies pending changes oldest first."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.errors import DependencyUnavailable
from core.settings import Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.payment_support import (
    new_payment,
    notification,
    payment_object,
    refund_object,
    rsa_key,
    sign,
)
from tests.payment_support import public_pem as public_pem_of
from tests.support import WEBHOOK, app_client, new_user, put_plan, unique_plan

SIGNER = rsa_key()


@pytest.fixture
async def http(settings: Settings, clock: FixedClock) -> AsyncIterator[httpx.AsyncClient]:
    signed = settings.with_overrides(webhook_public_key=public_pem_of(SIGNER))
    async with app_client(signed, clock) as client:
        yield client


async def deliver(http: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await http.post(WEBHOOK, content=body, headers={
        "X-Signature": sign(SIGNER, body), "Content-Type": "application/json"})


async def remain_chat(http: httpx.AsyncClient, user: str) -> Any:
    response = await http.get(f"/internal/billing/quota/check/{user}")
    assert response.status_code == 200, response.text
    return response.json()["remain_chat"]


def redis_refuses_payments(engine: Engine, refused: list[str]) -> None:
    """apply_payment.lua fails while ``refused`` holds anything (a Redis blip)."""
    scripts = engine.rt.scripts
    original = scripts.apply_payment

    async def blip(*args: Any, **kwargs: Any) -> Any:
        if refused:
            refused.pop()
            raise DependencyUnavailable("redis", "connection to Redis lost: test")
        return await original(*args, **kwargs)

    scripts.apply_payment = blip  # type: ignore[method-assign]


async def test_a_refund_overtaking_its_pending_credit_takes_back_what_it_wants(
    http: httpx.AsyncClient, raw_redis: aioredis.Redis
) -> None:
    """Credit 100 (its Redis step fails: pending), then a 40 % refund: the credit is applied
    first, so the refund takes 40 of 100 and 60 remain, in Redis and in PostgreSQL."""
    engine: Engine = http.engine  # type: ignore[attr-defined]
    plan, user, payment = unique_plan(), new_user(), new_payment()
    await put_plan(http, plan, {"chat": {"limit": 0, "period": "month"}})
    base = await remain_chat(http, user)  # the user is in Redis (the free plan)
    redis_refuses_payments(engine, ["credit"])
    paid = notification("payment.succeeded", payment_object(
        payment, user, plan, amount="100.00", units_chat="100"))
    assert (await deliver(http, paid)).status_code == 200
    assert await remain_chat(http, user) == base  # the credit is pending
    refund = notification("refund.succeeded",
                          refund_object("rf-" + payment, payment, "40.00"))
    response = await deliver(http, refund)
    assert response.status_code == 200, response.text
    assert await remain_chat(http, user) == 60  # the plan bought has no chat allowance
    async with engine.db.connection() as conn:
        taken = await conn.fetchval("SELECT taken FROM payment_refunds WHERE refund_id = $1",
                                    "rf-" + payment)
        pending = await conn.fetchval(
            "SELECT count(*) FROM redis_outbox WHERE user_id = $1 AND applied_at IS NULL", user)
    assert taken == {"chat": 40_000_000}
    assert pending == 0


async def test_a_refund_whose_credit_cannot_be_applied_waits_for_the_reconciler(
    http: httpx.AsyncClient, raw_redis: aioredis.Redis
) -> None:
    """Redis refuses the credit twice (at its commit and when the refund tries it first):
    the refund is not applied before it, and the reconciler applies both, oldest first."""
    engine: Engine = http.engine  # type: ignore[attr-defined]
    plan, user, payment = unique_plan(), new_user(), new_payment()
    await put_plan(http, plan, {"chat": {"limit": 0, "period": "month"}})
    base = await remain_chat(http, user)  # the user is in Redis (the free plan)
    redis_refuses_payments(engine, ["refund's first try of the credit", "credit"])
    paid = notification("payment.succeeded", payment_object(
        payment, user, plan, amount="100.00", units_chat="100"))
    assert (await deliver(http, paid)).status_code == 200
    refund = notification("refund.succeeded",
                          refund_object("rf-" + payment, payment, "40.00"))
    assert (await deliver(http, refund)).status_code == 200
    assert await remain_chat(http, user) == base  # neither reached Redis
    reconciler = Reconciler(engine, raw_redis, name="refund-order")
    reconciler.outbox_min_age = reconciler.outbox_min_age * 0
    assert await reconciler.apply_pending_outbox() >= 2
    assert await remain_chat(http, user) == 60
    async with engine.db.connection() as conn:
        taken = await conn.fetchval("SELECT taken FROM payment_refunds WHERE refund_id = $1",
                                    "rf-" + payment)
    assert taken == {"chat": 40_000_000}
