"""Payments against real Redis and PostgreSQL: credits, signed webhooks, refunds, report."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import ed25519

from core.clock import FixedClock
from core.settings import Caller, Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from reconciler.report import run
from tests.payment_support import (
    new_payment,
    notification,
    payment_object,
    public_pem,
    refund_object,
    rsa_key,
    sign,
)
from tests.support import (
    CREDIT,
    KEY,
    T0,
    WEBHOOK,
    app_client,
    debit,
    new_user,
    put_plan,
    read_metric,
    unique_plan,
)

PAY_KEY = "pay-svc-key-0123456789"
CHAT_KEY = "chat-svc-key-0123456789"
SIGNER = rsa_key()


@pytest.fixture
def pay_settings(settings: Settings) -> Settings:
    """Named callers (Pay-svc may credit, Chat-svc may only debit) and the webhook key."""
    return settings.with_overrides(
        callers=(Caller("pay-svc", PAY_KEY, frozenset({"credit", "read"})),
                 Caller("chat-svc", CHAT_KEY, frozenset({"debit", "read"}))),
        webhook_public_key=public_pem(SIGNER),
    )


@pytest.fixture
async def pay(pay_settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis
              ) -> AsyncIterator[httpx.AsyncClient]:
    """A client with Pay-svc's key (``pay.engine`` is the app's engine)."""
    async with app_client(pay_settings, clock, PAY_KEY) as http:
        yield http


async def remaining(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    response = await http.get(f"/internal/billing/quota/check/{user}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def pg(http: httpx.AsyncClient, sql: str, *args: Any) -> list[asyncpg.Record]:
    engine: Engine = http.engine  # type: ignore[attr-defined]
    async with engine.db.connection() as conn:
        return list(await conn.fetch(sql, *args))


def credit_body(order: str, user: str, plan: str = "pro_month", **extra: Any) -> dict[str, Any]:
    return {"order_id": order, "user_id": user, "plan_code": plan, "units_chat": 500,
            "units_tpl": 20, **extra}


async def signed(http: httpx.AsyncClient, body: bytes, key: Any = SIGNER,
                 **headers: str) -> httpx.Response:
    return await http.post(WEBHOOK, content=body, headers={
        "Content-Type": "application/json", "X-Signature": sign(key, body), **headers})


# -- POST /quota/credit ----------------------------------------------------------------------

async def test_credit_applies_plan_and_credits_once(pay: httpx.AsyncClient) -> None:
    """The plan with its duration and the credits; a repeat is a 409 with the same result."""
    user, order = new_user(), f"yka-{new_payment()}"
    response = await pay.post(CREDIT, json=credit_body(order, user))
    assert response.status_code == 200, response.text
    first = response.json()
    assert first["plan_code"] == "pro_month" and first["status"] == "active"
    assert first["applied"] is True
    assert first["credits"] == {"chat": 500, "template": 20}
    assert first["expires_at"].startswith("2026-12-23T12:00:00")  # 30 days from T0
    state = await remaining(pay, user)
    assert (state["remain_chat"], state["remain_tpl"]) == (10_500, 220)
    balance = (await pay.get("/internal/billing/balance", params={"user_id": user})).json()
    assert balance["plan"] == {"plan_code": "pro_month", "status": "active",
                               "expires_at": first["expires_at"]}

    again = await pay.post(CREDIT, json=credit_body(order, user))
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "duplicate_order"
    assert {k: again.json()[k] for k in first} == first
    assert await remaining(pay, user) == state

    receipt = await pg(pay, "SELECT * FROM payment_receipts WHERE order_id = $1", order)
    assert len(receipt) == 1 and receipt[0]["amount"] == Decimal("990.00")
    assert receipt[0]["caller"] == "pay-svc" and receipt[0]["status"] == "succeeded"
    ledger = await pg(pay, "SELECT meter, amount_micro FROM ledger WHERE kind = 'credit' "
                           "AND ref = $1 ORDER BY meter", order)
    assert [(r["meter"], r["amount_micro"]) for r in ledger] == [
        ("chat", 500_000_000), ("template", 20_000_000)]
    balances = await pg(pay, "SELECT meter, balance_micro FROM credit_balances "
                             "WHERE user_id = $1 ORDER BY meter", user)
    assert [(r["meter"], r["balance_micro"]) for r in balances] == [
        ("chat", 500_000_000), ("template", 20_000_000)]


async def test_credit_refusals_change_nothing(pay: httpx.AsyncClient, pay_settings: Settings,
                                              clock: FixedClock) -> None:
    """Reused order ids, unknown plans, wrong scopes and bad amounts: 4xx, nothing written."""
    user, order = new_user(), f"o-{new_payment()}"
    assert (await pay.post(CREDIT, json=credit_body(order, user))).status_code == 200
    before = await remaining(pay, user)
    reused = await pay.post(CREDIT, json=credit_body(order, user, units_chat=501))
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "order_reused"
    other_user = await pay.post(CREDIT, json=credit_body(order, new_user()))
    assert other_user.status_code == 422
    unknown = await pay.post(CREDIT, json=credit_body(f"o-{new_payment()}", user, "gold"))
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "plan_code"
    cases = [
        ({"units_chat": -1}, "units_chat"), ({"units_tpl": 0.0000001}, "units_tpl"),
        ({"units_chat": "NaN"}, "units_chat"), ({"amount": "9.999"}, "amount"),
        ({"amount": -1}, "amount"), ({"currency": "rub"}, "currency"),
        ({"order_id": ""}, "order_id"), ({"order_id": "a\nb"}, "order_id"),
        ({"user_id": "x" * 129}, "user_id"), ({"bonus": 1}, "bonus"),
    ]
    for change, field in cases:
        body = credit_body(f"o-{new_payment()}", user) | change
        response = await pay.post(CREDIT, json=body)
        assert response.status_code == 422, (change, response.text)
        assert response.json()["error"]["field"] == field, (change, response.text)
    async with app_client(pay_settings, clock, CHAT_KEY) as chat:
        forbidden = await chat.post(CREDIT, json=credit_body(f"o-{new_payment()}", user))
        assert forbidden.status_code == 403
    assert await remaining(pay, user) == before
    rows = await pg(pay, "SELECT count(*) AS n FROM payment_receipts WHERE user_id = $1", user)
    assert rows[0]["n"] == 1


async def test_credits_pay_once_the_allowance_is_spent(pay: httpx.AsyncClient,
                                                       client: httpx.AsyncClient) -> None:
    """A debit takes the plan's allowance first, then the credits, and says how much each."""
    plan, user = unique_plan(), new_user()
    await put_plan(client, plan, {"chat": {"limit": 2, "period": "day"}})
    response = await pay.post(CREDIT, json=credit_body(f"o-{new_payment()}", user, plan,
                                                       units_chat=5, units_tpl=0))
    assert response.status_code == 200 and response.json()["credits"] == {"chat": 5}
    spent = await debit(client, user, 4)
    assert spent.status_code == 200, spent.text
    assert (spent.json()["from_allowance"], spent.json()["from_credits"]) == (2, 2)
    assert (await debit(client, user, 4)).status_code == 403
    assert (await remaining(pay, user))["remain_chat"] == 3


async def test_credit_to_a_user_not_in_redis_is_loaded_once(
    pay: httpx.AsyncClient, raw_redis: aioredis.Redis, settings: Settings
) -> None:
    """A credit to a user whose state is not in Redis is applied by the load, not twice."""
    user = new_user()
    response = await pay.post(CREDIT, json=credit_body(f"o-{new_payment()}", user))
    assert response.status_code == 200 and response.json()["applied"] is True
    state = await remaining(pay, user)  # the first read loads the user from PostgreSQL
    assert (state["remain_chat"], state["remain_tpl"]) == (10_500, 220)
    engine: Engine = pay.engine  # type: ignore[attr-defined]
    await raw_redis.delete(engine.keys.user(user))  # evicted: loaded again, still once
    assert await remaining(pay, user) == state


async def test_a_credit_applied_twice_by_redo_counts_once(
    pay: httpx.AsyncClient, raw_redis: aioredis.Redis
) -> None:
    """The outbox row re-applied (crash after the Lua apply, before it was marked), and
    re-applied after Redis lost the user (the load marks it included): credited once."""
    user, order = new_user(), f"o-{new_payment()}"
    await remaining(pay, user)  # loaded before the credit: the apply adds in Redis
    assert (await pay.post(CREDIT, json=credit_body(order, user))).status_code == 200
    after = await remaining(pay, user)
    assert after["remain_chat"] == 10_500
    engine: Engine = pay.engine  # type: ignore[attr-defined]
    row = (await pg(pay, "SELECT o.* FROM redis_outbox o JOIN payment_receipts r "
                         "ON r.outbox_id = o.id WHERE r.order_id = $1", order))[0]
    await pg(pay, "UPDATE redis_outbox SET applied_at = NULL WHERE id = $1", row["id"])
    assert await engine.outbox.apply(row["id"], user, "credit", row["payload"], quiet=False)
    assert await remaining(pay, user) == after
    await pg(pay, "UPDATE redis_outbox SET applied_at = NULL WHERE id = $1", row["id"])
    for key in [k async for k in raw_redis.scan_iter(match=engine.keys.user(user) + "*")]:
        await raw_redis.delete(key)
    assert await remaining(pay, user) == after  # reloaded, the pending credit marked
    assert await engine.outbox.apply(row["id"], user, "credit", row["payload"], quiet=False)
    assert await remaining(pay, user) == after


async def test_twenty_concurrent_credits_of_one_order_credit_once(
    pay: httpx.AsyncClient
) -> None:
    user, order = new_user(), f"o-{new_payment()}"
    responses = await asyncio.gather(*(pay.post(CREDIT, json=credit_body(order, user))
                                       for _ in range(20)))
    assert Counter(r.status_code for r in responses) == {200: 1, 409: 19}
    assert len({r.json()["tx_id"] for r in responses}) == 1
    assert (await remaining(pay, user))["remain_chat"] == 10_500


# -- the webhook, signature mode ------------------------------------------------------------

async def dead_letters(http: httpx.AsyncClient, ids: list[int]) -> list[asyncpg.Record]:
    return await pg(http, "SELECT * FROM dead_letters WHERE id = ANY($1::bigint[]) ORDER BY id",
                    ids)


async def test_signed_notifications_credit_and_forgeries_are_recorded_not_kept(
    pay: httpx.AsyncClient, pay_settings: Settings, clock: FixedClock,
) -> None:
    """RSA and Ed25519 signatures credit; tampering, a wrong key, a missing or malformed
    header and an oversized body credit nothing and are recorded (sender, reason, size,
    SHA-256 of the body), never kept whole; a replayed old notification of a credited
    payment answers 200 and changes nothing."""
    user = new_user()
    payment = new_payment()
    body = notification("payment.succeeded",
                        payment_object(payment, user, "pro_month", units_chat="100"))
    ok = await signed(pay, body)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"status": "processed", "event": "payment.succeeded",
                         "order_id": payment, "refund_id": None}
    assert (await remaining(pay, user))["remain_chat"] == 10_100

    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_user = new_user()
    async with app_client(pay_settings.with_overrides(webhook_public_key=public_pem(ed_key)),
                          clock, PAY_KEY) as ed:
        ed_body = notification("payment.succeeded",
                               payment_object(new_payment(), ed_user, "base750", amount="5.00",
                                              units_chat=7))
        response = await signed(ed, ed_body, ed_key)
        assert response.status_code == 200, response.text
        assert (await remaining(ed, ed_user))["remain_chat"] == 7

    victim = new_user()
    forged = notification("payment.succeeded",
                          payment_object(new_payment(), victim, "pro_month", units_chat="100"))
    tampered = forged.replace(b'"100"', b'"900"')
    attempts = {
        "tampered": await pay.post(WEBHOOK, content=tampered, headers={
            "Content-Type": "application/json", "X-Signature": sign(SIGNER, forged)}),
        "wrong key": await signed(pay, forged, rsa_key()),
        "missing header": await pay.post(WEBHOOK, content=forged),
        "malformed header": await pay.post(WEBHOOK, content=forged,
                                           headers={"X-Signature": "not base64!"}),
        "ed25519 for an RSA key": await signed(pay, forged, ed_key),
        "oversized": await signed(pay, forged + b" " * (64 * 1024)),
        # an event that is no string (unhashable): the metric's label must not crash
        "event a list": await pay.post(WEBHOOK, content=b'{"event": [1], "object": {}}'),
        "event an object": await pay.post(WEBHOOK, content=b'{"event": {}, "object": {}}'),
    }
    for name, response in attempts.items():
        assert response.status_code in (401, 413), (name, response.text)
        assert response.json()["rejection_id"], name
        assert "dead_letter_id" not in response.json(), name
    kept = await pg(pay, "SELECT * FROM webhook_rejections WHERE id = ANY($1::bigint[]) "
                         "ORDER BY id", [r.json()["rejection_id"] for r in attempts.values()])
    assert len(kept) == len(attempts)
    assert bytes(kept[0]["body_sha256"]) == hashlib.sha256(tampered).digest()
    assert kept[0]["size"] == len(tampered) and "signature" in kept[0]["reason"]
    assert "body" not in kept[0]
    assert (await remaining(pay, victim))["plan_code"] == "free"
    assert not await pg(pay, "SELECT 1 FROM payment_receipts WHERE user_id = $1", victim)

    replay = await signed(pay, body)  # the old, genuine notification once more
    assert replay.status_code == 200 and replay.json()["status"] == "duplicate"
    assert (await remaining(pay, user))["remain_chat"] == 10_100


async def test_the_same_payment_delivered_twenty_times_concurrently_credits_once(
    pay: httpx.AsyncClient
) -> None:
    user, payment = new_user(), new_payment()
    body = notification("payment.succeeded",
                        payment_object(payment, user, "pro_month", units_chat="100"))
    responses = await asyncio.gather(*(signed(pay, body) for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    assert Counter(r.json()["status"] for r in responses) == {"processed": 1, "duplicate": 19}
    assert (await remaining(pay, user))["remain_chat"] == 10_100
    rows = await pg(pay, "SELECT count(*) AS n FROM ledger WHERE kind = 'credit' AND ref = $1",
                    payment)
    assert rows[0]["n"] == 1


async def test_unprocessable_notifications_are_kept_and_answered_4xx(
    pay: httpx.AsyncClient
) -> None:
    """Signed but unusable: unknown plan, no user, bad JSON, unknown event, status that
    does not match the event, reused payment id, bad units or user id. Each is a dead
    letter; none credits."""
    user = new_user()
    payment = new_payment()
    assert (await signed(pay, notification("payment.succeeded", payment_object(
        payment, user, "pro_month")))).status_code == 200
    bodies = [
        ("unknown_plan", notification("payment.succeeded",
                                      payment_object(new_payment(), user, "gold"))),
        ("unknown_user", notification("payment.succeeded",
                                      payment_object(new_payment(), None, "pro_month"))),
        ("malformed_json", b'{"event": "payment.succeeded", '),
        ("unknown_event", notification("payment.waiting_for_capture",
                                       payment_object(new_payment(), user, "pro_month"))),
        ("unknown_event", b'{"event": [1], "object": {}}'),
        ("unknown_event", b'{"event": {"a": 1}, "object": {}}'),
        ("status_mismatch", notification("payment.succeeded", payment_object(
            new_payment(), user, "pro_month", status="pending"))),
        ("order_reused", notification("payment.succeeded", payment_object(
            payment, new_user(), "pro_month"))),
        ("invalid_notification", notification("payment.succeeded", payment_object(
            new_payment(), user, "pro_month", units_chat="-5"))),
        ("invalid_notification", notification("payment.succeeded", payment_object(
            new_payment(), f"{user}:r:x", "pro_month"))),
    ]
    for code, body in bodies:
        response = await signed(pay, body)
        assert 400 <= response.status_code < 500, (code, response.text)
        assert response.json()["error"]["code"] == code, (code, response.text)
        [row] = await dead_letters(pay, [response.json()["dead_letter_id"]])
        assert bytes(row["body"]) == body and code in row["reason"]
        assert "x-signature" in row["headers"] and "x-internal-key" not in row["headers"]
    receipts = await pg(pay, "SELECT count(*) AS n FROM payment_receipts WHERE user_id = $1",
                        user)
    assert receipts[0]["n"] == 1


async def test_api_credit_and_notification_of_one_order_credit_once(
    pay: httpx.AsyncClient
) -> None:
    """Pay-svc credits order X, then the provider's notification names order X: one credit.
    A second payment naming the same order is kept as a dead letter for finance."""
    user, order = new_user(), f"yka-{new_payment()}"
    body = credit_body(order, user, units_chat=100, units_tpl=0)
    assert (await pay.post(CREDIT, json=body)).status_code == 200
    first = await signed(pay, notification("payment.succeeded", payment_object(
        new_payment(), user, "pro_month", units_chat="100", order_id=order)))
    assert first.status_code == 200 and first.json()["status"] == "duplicate"
    paid_twice = await signed(pay, notification("payment.succeeded", payment_object(
        new_payment(), user, "pro_month", units_chat="100", order_id=order)))
    assert paid_twice.status_code == 422, paid_twice.text
    assert "already paid by payment" in paid_twice.json()["error"]["message"]
    assert (await remaining(pay, user))["remain_chat"] == 10_100


async def test_canceled_payment_is_recorded_and_credits_nothing(
    pay: httpx.AsyncClient
) -> None:
    user, payment = new_user(), new_payment()
    body = notification("payment.canceled", payment_object(payment, user, "pro_month",
                                                           status="canceled"))
    first, again = await signed(pay, body), await signed(pay, body)
    assert first.json()["status"] == "processed" and again.json()["status"] == "duplicate"
    rows = await pg(pay, "SELECT status FROM payment_receipts WHERE payment_id = $1", payment)
    assert [r["status"] for r in rows] == ["canceled"]
    assert (await remaining(pay, user))["plan_code"] == "free"
    late = await signed(pay, notification("payment.succeeded",
                                          payment_object(payment, user, "pro_month")))
    assert late.status_code == 422 and late.json()["error"]["code"] == "order_reused"


# -- refunds -------------------------------------------------------------------------------

async def test_refund_survives_redis_losing_its_stream_before_the_flush(
    pay: httpx.AsyncClient, client: httpx.AsyncClient, engine: Engine,
    raw_redis: aioredis.Redis, settings: Settings,
) -> None:
    """A refund takes 40 of 100 credits in Redis; then Redis loses every key (the refund's
    ledger event among them) before the reconciler flushed it. Its ledger events were
    written through with the refund, so the reload from PostgreSQL keeps the 40 taken back;
    the ledger holds the refund once, and PostgreSQL's balance the refund and a later debit."""
    plan, user, payment = unique_plan(), new_user(), new_payment()
    await put_plan(client, plan, {"chat": {"limit": 0, "period": "month"}})
    body = notification("payment.succeeded", payment_object(
        payment, user, plan, amount="100.00", units_chat="100"))
    assert (await signed(pay, body)).status_code == 200
    refund_id = "rf-lost-" + payment
    refund = notification("refund.succeeded", refund_object(refund_id, payment, "40.00"))
    assert (await signed(pay, refund)).status_code == 200
    assert (await remaining(pay, user))["remain_chat"] == 60

    lost = [k async for k in raw_redis.scan_iter(match=f"{settings.key_prefix}:*")]
    assert await raw_redis.delete(*lost) >= 2  # the user's state and the shard stream
    assert (await remaining(pay, user))["remain_chat"] == 60  # reloaded from PostgreSQL
    assert (await debit(client, user, 5)).status_code == 200
    await Reconciler(engine, raw_redis, name="lost-stream").drain()
    ledger = await pg(pay, "SELECT amount_micro, from_credits_micro, plan_code, occurred_at "
                           "FROM ledger WHERE kind = 'refund' AND ref = $1", refund_id)
    assert [tuple(r) for r in ledger] == [
        (-40_000_000, 40_000_000, plan, datetime.fromtimestamp(T0 / 1000, UTC))]
    balance = await pg(pay, "SELECT balance_micro FROM credit_balances WHERE user_id = $1 "
                            "AND meter = 'chat'", user)
    assert balance[0]["balance_micro"] == 55_000_000
    assert (await remaining(pay, user))["remain_chat"] == 55


# -- the report (it reads every receipt of the day: on a database of its own) -------------

class TestReportOnADatabaseOfItsOwn:
    """The report checks every succeeded receipt of its day in the database, so these tests
    run on a database of their own: their counts are exact whatever else ran before."""

    @pytest.fixture
    def settings(self, settings: Settings, own_db_dsn: str) -> Settings:
        """The test's settings (and so pay, client and engine) on its own database."""
        return settings.with_overrides(db_dsn=own_db_dsn)

    async def test_refund_after_partial_spending_takes_back_what_is_left(
        self, pay: httpx.AsyncClient, client: httpx.AsyncClient, engine: Engine,
        raw_redis: aioredis.Redis, tmp_path: Path,
    ) -> None:
        """100 chat credits bought for 100.00, 70 spent. A 50.00 refund wants 50 back but only
        30 are left: it takes 30 (the shortfall is recorded). The final 50.00 refund wants the
        other 50, takes 0, and ends the plan. The ledger (after the reconciler) and PostgreSQL's
        balance agree with Redis, and the report matches the payment: the day's one payment,
        no drift; with its ledger credit deleted, exactly that payment is reported."""
        plan, user, payment = unique_plan(), new_user(), new_payment()
        await put_plan(client, plan, {"chat": {"limit": 0, "period": "month"}})
        body = notification("payment.succeeded", payment_object(
            payment, user, plan, amount="100.00", units_chat="100"))
        assert (await signed(pay, body)).status_code == 200
        spent = await debit(client, user, 70)
        assert spent.status_code == 200 and spent.json()["from_credits"] == 70

        half = notification("refund.succeeded", refund_object("rf-1-" + payment, payment, "50.00"))
        response = await signed(pay, half)
        assert response.status_code == 200, response.text
        assert response.json()["refund_id"] == "rf-1-" + payment
        assert (await remaining(pay, user))["remain_chat"] == 0
        rest = notification("refund.succeeded", refund_object("rf-2-" + payment, payment, "50.00"))
        assert (await signed(pay, rest)).status_code == 200
        assert (await signed(pay, rest)).json()["status"] == "duplicate"
        too_much = notification("refund.succeeded", refund_object("rf-3-" + payment, payment,
                                                                  "0.01"))
        refused = await signed(pay, too_much)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "refund_exceeds_payment"

        refunds = await pg(pay, "SELECT refund_id, wanted, taken, plan_revoked FROM "
                                "payment_refunds WHERE order_id = $1 ORDER BY refund_id", payment)
        assert [(r["wanted"], r["taken"], r["plan_revoked"]) for r in refunds] == [
            ({"chat": 50_000_000}, {"chat": 30_000_000}, False),
            ({"chat": 50_000_000}, {"chat": 0}, True),
        ]
        state = await remaining(pay, user)
        assert state["meters"]["chat"]["credits"] == 0
        assert (state["plan_code"], state["assigned_plan"], state["plan_status"]) == (
            "free", plan, "expired")  # the bought plan ended at the refund

        await Reconciler(engine, raw_redis, name="refund-test").drain()
        ledger = await pg(pay, "SELECT ref, amount_micro, from_credits_micro, reason FROM ledger "
                               "WHERE kind = 'refund' AND user_id = $1 ORDER BY ref", user)
        assert [(r["ref"], r["amount_micro"], r["reason"]) for r in ledger] == [
            ("rf-1-" + payment, -30_000_000, "wanted=50000000"),
            ("rf-2-" + payment, 0, "wanted=50000000"),
        ]
        balance = await pg(pay, "SELECT balance_micro FROM credit_balances WHERE user_id = $1 "
                                "AND meter = 'chat'", user)
        assert balance[0]["balance_micro"] == 0

        report = await run(engine, raw_redis, date(2026, 11, 23), tmp_path)
        assert (report.payments_checked, report.drift_count) == (1, 0), report.payment_mismatches
        await pg(pay, "DELETE FROM ledger WHERE kind = 'credit' AND ref = $1", payment)
        broken = await run(engine, raw_redis, date(2026, 11, 23), tmp_path)
        assert broken.payment_mismatches == [
            {"order_id": payment, "user_id": user, "receipt": {"chat": "100"}, "ledger": {},
             "applied_in_redis": True}]
        assert (broken.payments_checked, broken.drift_count, broken.drift) == (1, 1, [])

    async def test_report_matches_every_payment_of_the_day(
        self, pay: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis, tmp_path: Path,
        clock: FixedClock,
    ) -> None:
        """Credits through the API and the webhook on one day are each matched once: the
        report checks exactly these six payments and finds none unmatched."""
        day = datetime.fromtimestamp(clock.now_ms() / 1000, UTC).date()
        for i in range(3):
            assert (await pay.post(CREDIT, json=credit_body(f"o{i}-{new_payment()}",
                                                            new_user()))).status_code == 200
            assert (await signed(pay, notification("payment.succeeded", payment_object(
                new_payment(), new_user(), "pro_month", units_tpl="3")))).status_code == 200
        report = await run(engine, raw_redis, day, tmp_path)
        assert report.payments_checked == 6 and report.payment_mismatches == []
        page = (tmp_path / f"reconciliation-{day}.html").read_text()
        assert "6 succeeded payments" in page
        summary = orjson.loads((tmp_path / f"reconciliation-{day}.json").read_bytes())
        assert summary["payments_checked"] == 6


async def test_metrics_count_webhooks_and_dead_letters(
    pay_settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis, own_db_dsn: str,
) -> None:
    """A signed payment with chat credits and its unsigned copy add exactly one processed
    and one rejected notification, one recorded unverified rejection and one chat credit
    applied. The pending-applies gauge is what the reconciler finds waiting: 1 with the
    payment's outbox row marked unapplied, 0 once it applied it (the count is of the whole
    database: a database of the test's own)."""
    counted = [("quota_webhooks_total", {"event": "payment.succeeded", "outcome": "processed"}),
               ("quota_webhooks_total",
                {"event": "payment.succeeded", "outcome": "rejected"}),
               ("quota_webhook_rejections_total", {"reason": "unverified", "kept": "true"}),
               ("quota_credits_total", {"meter": "chat"})]
    payment = new_payment()
    body = notification("payment.succeeded", payment_object(payment, new_user(), "pro_month",
                                                            units_chat="100"))
    async with app_client(pay_settings.with_overrides(db_dsn=own_db_dsn), clock,
                          PAY_KEY) as pay:
        before = [await read_metric(pay, name, **labels) for name, labels in counted]
        assert (await signed(pay, body)).status_code == 200
        assert (await pay.post(WEBHOOK, content=body)).status_code == 401  # unsigned
        after = [await read_metric(pay, name, **labels) for name, labels in counted]
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]

        await pg(pay, "UPDATE redis_outbox SET applied_at = NULL WHERE id = (SELECT "
                      "outbox_id FROM payment_receipts WHERE payment_id = $1)", payment)
        engine: Engine = pay.engine  # type: ignore[attr-defined]
        reconciler = Reconciler(engine, raw_redis, name="pending-gauge")
        reconciler.outbox_min_age = timedelta(0)
        assert await reconciler.apply_pending_outbox() == 1
        assert await read_metric(pay, "quota_pending_applies") == 1
        assert await reconciler.apply_pending_outbox() == 0
        assert await read_metric(pay, "quota_pending_applies") == 0


async def test_openapi_lists_the_payment_routes(pay: httpx.AsyncClient) -> None:
    spec = (await pay.get("/openapi.json")).json()
    assert "/internal/billing/quota/credit" in spec["paths"]
    assert "/internal/billing/webhook/payment" in spec["paths"]
    assert KEY  # the default key is still the service token
