"""A user's credit balance of a meter is capped far below 2^53 micro-units (issue #17,
defect 2): each credit was capped, their sum was not, so ten maximal credits took
``cr:<meter>`` past what Lua's doubles hold exactly. Past the cap a credit is refused with
422 and changes nothing, and every script refuses a stored sum past 2^53."""

from __future__ import annotations

import json
import secrets
from decimal import Decimal

import httpx
import pytest
import redis.asyncio as aioredis

from core.amounts import MAX_BALANCE_MICRO, MAX_UNITS
from core.clock import FixedClock
from core.errors import InvariantBroken
from core.settings import Settings
from quota.engine import Engine
from tests.payment_support import new_payment, notification, payment_object, rsa_key, sign
from tests.payment_support import public_pem as public_pem_of
from tests.support import CREDIT, WEBHOOK, app_client, debit, new_user

SIGNER = rsa_key()


def credit_body(user: str, units_chat: int) -> dict[str, object]:
    return {"order_id": f"o-{secrets.token_hex(6)}", "user_id": user, "plan_code": "free",
            "units_chat": units_chat, "units_tpl": 0, "amount": 0}


def exact(response: httpx.Response) -> dict[str, Decimal]:
    """A JSON answer with its numbers read exactly."""
    return dict(json.loads(response.text, parse_float=Decimal, parse_int=Decimal))


async def pg_balance(engine: Engine, user: str) -> int | None:
    async with engine.db.connection() as conn:
        value: int | None = await conn.fetchval(
            "SELECT balance_micro FROM credit_balances WHERE user_id = $1 AND meter = 'chat'",
            user)
        return value


async def test_credits_past_the_balance_cap_are_422_and_change_nothing(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """Ten maximal credits under different order ids: those that fit under the cap are
    credited, the next answers 422 naming units_chat and records nothing (no receipt, no
    balance, nothing in Redis); debits then answer exact amounts."""
    user = new_user()
    assert (await client.get(f"/internal/billing/quota/check/{user}")).status_code == 200
    fits = MAX_BALANCE_MICRO // (MAX_UNITS * 1_000_000)
    answers = [await client.post(CREDIT, json=credit_body(user, MAX_UNITS)) for _ in range(10)]
    assert [r.status_code for r in answers] == [200] * fits + [422] * (10 - fits)
    refused = answers[fits].json()["error"]
    assert (refused["code"], refused["field"]) == ("balance_limit", "units_chat")
    assert await pg_balance(engine, user) == MAX_BALANCE_MICRO
    held = await raw_redis.hget(engine.keys.user(user), "cr:chat")
    assert int(held) == MAX_BALANCE_MICRO
    async with engine.db.connection() as conn:
        receipts = await conn.fetchval("SELECT count(*) FROM payment_receipts WHERE user_id = $1",
                                       user)
    assert receipts == fits
    check = await client.get(f"/internal/billing/quota/check/{user}")
    before = exact(check)["remain_chat"]
    spent = await debit(client, user, "0.000001")
    assert spent.status_code == 200, spent.text
    assert exact(spent)["remaining"] == before - Decimal("0.000001")  # to the micro-unit


async def test_a_payment_past_the_balance_cap_is_a_dead_letter(
    settings: Settings, clock: FixedClock, engine: Engine
) -> None:
    """The webhook refuses the credit that would pass the cap: 422 naming the metadata
    field, kept as a dead letter, the balance unchanged."""
    user = new_user()
    signed = settings.with_overrides(webhook_public_key=public_pem_of(SIGNER))
    async with app_client(signed, clock) as http:
        for _ in range(MAX_BALANCE_MICRO // (MAX_UNITS * 1_000_000)):
            assert (await http.post(CREDIT, json=credit_body(user, MAX_UNITS))).status_code \
                == 200
        body = notification("payment.succeeded", payment_object(
            new_payment(), user, "free", amount="0.00", units_chat=str(MAX_UNITS)))
        response = await http.post(WEBHOOK, content=body,
                                   headers={"X-Signature": sign(SIGNER, body),
                                            "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("balance_limit", "object.metadata.units_chat")
    assert response.json()["dead_letter_id"] > 0
    assert await pg_balance(engine, user) == MAX_BALANCE_MICRO


@pytest.mark.parametrize("field", ["cr:chat", "n:units"])
async def test_scripts_refuse_a_stored_sum_past_2_53(
    engine: Engine, raw_redis: aioredis.Redis, field: str
) -> None:
    """A credit balance or lifetime usage at 2^53 + 1 in Redis (unreachable through the
    API) makes debit and check refuse with the script's own error, not answer a rounded
    amount."""
    user = new_user()
    reply = await engine.check(user)  # loads the user
    assert reply.plan_code == "free"
    await raw_redis.hset(engine.keys.user(user), field, str(2**53 + 1))
    meter = field.split(":", 1)[1]
    with pytest.raises(InvariantBroken, match="past 2\\^53"):
        await engine.debit(user, meter, 1, f"r-{secrets.token_hex(4)}")
    with pytest.raises(InvariantBroken, match="past 2\\^53"):
        await engine.check(user, [meter])


async def test_a_credit_that_would_pass_2_53_in_redis_is_refused_before_writing(
    engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """apply_payment.lua checks every credit's sum before its first write: a balance that
    a credit would take past 2^53 is refused and left as it was."""
    user = new_user()
    await engine.check(user)
    key = engine.keys.user(user)
    await raw_redis.hset(key, mapping={"cr:chat": str(2**53 - 10), "cr:template": "5"})
    payload = {"order_id": f"o-{secrets.token_hex(4)}", "caller": "test",
               "credits": [["template", 7, "01900000-0000-7000-8000-000000000001"],
                           ["chat", 11, "01900000-0000-7000-8000-000000000002"]],
               "plan": {}}
    with pytest.raises(InvariantBroken, match="pass 2\\^53"):
        await engine.outbox.apply_payment(10**9 + secrets.randbelow(10**6), user, "credit",
                                          payload, engine.clock.now_ms())
    assert await raw_redis.hmget(key, "cr:chat", "cr:template") == [str(2**53 - 10), "5"]

