"""Payments under failure, YooKassa verification against a fake provider on loopback, and
the dead-letter CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from ops.devservers import EmbeddedPostgres, EmbeddedRedis, free_port
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.payment_support import (
    FakeProvider,
    new_payment,
    notification,
    payment_object,
    public_pem,
    refund_object,
    rsa_key,
    serve_provider,
    sign,
)
from tests.support import CREDIT, WEBHOOK, app_client, make_engine, new_user

YOOKASSA_ADDRESS = "185.71.76.5"


async def remain_chat(http: httpx.AsyncClient, user: str) -> int:
    response = await http.get(f"/internal/billing/quota/check/{user}")
    assert response.status_code == 200, response.text
    return int(response.json()["remain_chat"])


async def sql(engine: Engine, query: str, *args: Any) -> list[Any]:
    async with engine.db.connection() as conn:
        return list(await conn.fetch(query, *args))


def credit_body(user: str, units: int = 500) -> dict[str, Any]:
    return {"order_id": f"o-{new_payment()}", "user_id": user, "plan_code": "pro_month",
            "units_chat": units}


# -- Redis killed between the PostgreSQL commit and the Redis apply -------------------------

@pytest.mark.timeout(120)
async def test_redis_killed_between_commit_and_apply_credits_exactly_once(
    settings: Settings, clock: FixedClock, tmp_path: Path, own_db_dsn: str
) -> None:
    """Redis (with its append-only file) is SIGKILLed after the credit's PostgreSQL commit
    and before its Redis apply: the answer is 200 with ``applied: false``. Redis comes back
    from its AOF as another process (run_id): the service answers 503 until it has rebuilt
    the users from PostgreSQL (hotpath/instance.py), whose loads bring the credit; the
    reconciler's later apply of the outbox finds exactly the two rows and adds nothing;
    re-running it finds none. (Pending rows are read from the whole database: a database
    of the test's own, so the counts are its two.)"""
    private = EmbeddedRedis(tmp_path / "redis", persist=True, appendfsync="always")
    url = await asyncio.to_thread(private.start)
    local = settings.with_overrides(redis_url=url, db_dsn=own_db_dsn)
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        async with app_client(local, clock) as http:
            engine: Engine = http.engine  # type: ignore[attr-defined]
            held, loaded_later = new_user(), new_user()
            base = await remain_chat(http, held)  # in Redis before the credit
            original = engine.outbox.apply

            async def crash_before_apply(*args: Any, **kwargs: Any) -> bool:
                if private.process is not None:
                    await asyncio.to_thread(private.kill)
                return await original(*args, **kwargs)

            engine.outbox.apply = crash_before_apply  # type: ignore[method-assign]
            for user in (held, loaded_later):
                response = await http.post(CREDIT, json=credit_body(user))
                assert response.status_code == 200, response.text
                assert response.json()["applied"] is False
            engine.outbox.apply = original  # type: ignore[method-assign]
            pending = await sql(engine, "SELECT count(*) AS n FROM redis_outbox "
                                        "WHERE applied_at IS NULL AND user_id = ANY($1)",
                                [held, loaded_later])
            assert pending[0]["n"] == 2

            await asyncio.to_thread(private.start)  # same port, state from the AOF
            refused = await http.get(f"/internal/billing/quota/check/{loaded_later}")
            assert refused.status_code == 503  # a Redis back from a file is rebuilt first
            assert engine.guard.rebuild is not None
            await asyncio.wait_for(engine.guard.rebuild, 10)
            assert await remain_chat(http, loaded_later) == 10_500  # loaded with the credit
            reconciler = Reconciler(make_engine(local, clock), admin, name="credit-redo")
            reconciler.outbox_min_age = timedelta(0)
            try:
                assert await reconciler.apply_pending_outbox() == 2
                assert await reconciler.apply_pending_outbox() == 0
            finally:
                await reconciler.engine.close()
            assert base == 50  # the free plan's daily chat allowance
            assert await remain_chat(http, held) == 10_500  # pro_month + 500 credits, once
            assert await remain_chat(http, loaded_later) == 10_500
    finally:
        await admin.aclose()
        await asyncio.to_thread(private.stop)


# -- PostgreSQL down: 503 and nothing half-applied -------------------------------------------

@pytest.mark.timeout(180)
async def test_postgres_down_webhooks_answer_503_and_nothing_is_half_applied(
    settings: Settings, clock: FixedClock, private_postgres: EmbeddedPostgres,
    raw_redis: aioredis.Redis,
) -> None:
    signer = rsa_key()
    local = settings.with_overrides(db_dsn=private_postgres.dsn, db_timeout_seconds=2.0,
                                    webhook_public_key=public_pem(signer))
    user, payment = new_user(), new_payment()
    body = notification("payment.succeeded",
                        payment_object(payment, user, "pro_month", units_chat="100"))
    headers = {"Content-Type": "application/json", "X-Signature": sign(signer, body)}
    async with app_client(local, clock) as http:
        before = await remain_chat(http, user)
        await asyncio.to_thread(private_postgres.stop)
        for _ in range(3):
            response = await http.post(WEBHOOK, content=body, headers=headers)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
        forged = await http.post(WEBHOOK, content=body, headers={"X-Signature": "AAAA"})
        assert forged.status_code == 503  # its dead letter cannot be stored: retry
        credit = await http.post(CREDIT, json=credit_body(user))
        assert credit.status_code == 503
        assert await remain_chat(http, user) == before  # Redis untouched
        await asyncio.to_thread(private_postgres.start)
        engine: Engine = http.engine  # type: ignore[attr-defined]
        assert not await sql(engine, "SELECT 1 FROM payment_receipts WHERE user_id = $1", user)
        assert not await sql(engine, "SELECT 1 FROM ledger WHERE user_id = $1", user)
        retried = await http.post(WEBHOOK, content=body, headers=headers)
        assert retried.status_code == 200 and retried.json()["status"] == "processed"
        assert await remain_chat(http, user) == 10_100
        again = await http.post(WEBHOOK, content=body, headers=headers)
        assert again.json()["status"] == "duplicate"
        assert await remain_chat(http, user) == 10_100


# -- YooKassa mode ------------------------------------------------------------------------

@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    async with serve_provider(FakeProvider()) as fake:
        yield fake


def yookassa(settings: Settings, provider: FakeProvider) -> Settings:
    return settings.with_overrides(
        webhook_verifier="yookassa", yookassa_api_url=provider.url,
        yookassa_shop_id=provider.shop_id, yookassa_secret_key=provider.secret,
        trusted_proxies=("10.0.0.0/8",),
    )


async def test_yookassa_trusts_only_the_provider_and_its_networks(
    settings: Settings, clock: FixedClock, provider: FakeProvider, raw_redis: aioredis.Redis,
) -> None:
    """From YooKassa's network with the provider confirming: credited with the provider's
    metadata, not the body's. From elsewhere, or while the provider says ``pending``: a
    dead letter and no credit. Behind a trusted proxy the forwarded address counts."""
    local = yookassa(settings, provider)
    user, payment = new_user(), new_payment()
    provider.objects[f"payments/{payment}"] = payment_object(payment, user, "pro_month",
                                                             units_chat="100")
    claimed = notification("payment.succeeded",
                           payment_object(payment, user, "pro_month", units_chat="900"))
    async with app_client(local, clock, address=YOOKASSA_ADDRESS) as http:
        response = await http.post(WEBHOOK, content=claimed)
        assert response.status_code == 200, response.text
        assert await remain_chat(http, user) == 10_100  # the provider's 100, not 900

    outsider = new_user()
    other = new_payment()
    provider.objects[f"payments/{other}"] = payment_object(other, outsider, "pro_month",
                                                           units_chat="100")
    body = notification("payment.succeeded", provider.objects[f"payments/{other}"])
    asked = provider.requests
    async with app_client(local, clock, address="203.0.113.9") as http:
        refused = await http.post(WEBHOOK, content=body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "sender_not_allowed"
        spoofed = await http.post(WEBHOOK, content=body,
                                  headers={"X-Forwarded-For": YOOKASSA_ADDRESS})
        assert spoofed.status_code == 403  # the peer is no trusted proxy
        assert provider.requests == asked  # never asked on behalf of an outsider
        assert (await http.get(f"/internal/billing/quota/check/{outsider}")
                ).json()["plan_code"] == "free"
    async with app_client(local, clock, address="10.1.2.3") as http:
        proxied = await http.post(WEBHOOK, content=body, headers={
            "X-Forwarded-For": f"198.51.100.1, {YOOKASSA_ADDRESS}"})
        assert proxied.status_code == 200, proxied.text
        assert await remain_chat(http, outsider) == 10_100

    early = new_payment()
    provider.objects[f"payments/{early}"] = payment_object(early, user, "pro_month",
                                                           status="pending", units_chat="5")
    lying = notification("payment.succeeded",
                         payment_object(early, user, "pro_month", units_chat="5"))
    async with app_client(local, clock, address=YOOKASSA_ADDRESS) as http:
        pending = await http.post(WEBHOOK, content=lying)
        assert pending.status_code == 422, pending.text
        assert pending.json()["error"]["code"] == "status_mismatch"
        assert await remain_chat(http, user) == 10_100
        unknown = notification("payment.succeeded",
                               payment_object(new_payment(), user, "pro_month"))
        assert (await http.post(WEBHOOK, content=unknown)).status_code == 422


async def test_yookassa_refund_is_confirmed_and_provider_outage_is_503(
    settings: Settings, clock: FixedClock, provider: FakeProvider, raw_redis: aioredis.Redis,
) -> None:
    local = yookassa(settings, provider)
    user, payment = new_user(), new_payment()
    provider.objects[f"payments/{payment}"] = payment_object(payment, user, "pro_month",
                                                             amount="100.00", units_chat="100")
    refund = f"rf-{payment}"
    provider.objects[f"refunds/{refund}"] = refund_object(refund, payment, "100.00")
    async with app_client(local, clock, address=YOOKASSA_ADDRESS) as http:
        paid = await http.post(WEBHOOK, content=notification(
            "payment.succeeded", provider.objects[f"payments/{payment}"]))
        assert paid.status_code == 200
        refunded = await http.post(WEBHOOK, content=notification(
            "refund.succeeded", provider.objects[f"refunds/{refund}"]))
        assert refunded.status_code == 200, refunded.text
        state = (await http.get(f"/internal/billing/quota/check/{user}")).json()
        assert state["meters"]["chat"]["credits"] == 0 and state["plan_status"] == "expired"

    down = local.with_overrides(yookassa_api_url=f"http://127.0.0.1:{free_port()}/v3",
                                provider_timeout_seconds=1.0)
    async with app_client(down, clock, address=YOOKASSA_ADDRESS) as http:
        other = new_payment()
        response = await http.post(WEBHOOK, content=notification(
            "payment.succeeded", payment_object(other, user, "pro_month")))
        assert response.status_code == 503, response.text
        assert "dead_letter_id" not in response.json()


# -- the dead-letter CLI -------------------------------------------------------------------

def cli(settings: Settings, provider: FakeProvider, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "DB_DSN": settings.db_dsn or "",
           "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards),
           "WEBHOOK_VERIFIER": "yookassa", "YOOKASSA_API_URL": provider.url,
           "YOOKASSA_SHOP_ID": provider.shop_id, "YOOKASSA_SECRET_KEY": provider.secret}
    command = Path(sys.executable).with_name("quota-gateway")
    return subprocess.run([str(command), "dead-letters", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def listed_ids(stdout: str) -> set[int]:
    return {int(line.split("\t", 1)[0]) for line in stdout.splitlines() if "\t" in line}


@pytest.mark.timeout(120)
async def test_dead_letters_can_be_listed_shown_fixed_and_replayed(
    settings: Settings, clock: FixedClock, provider: FakeProvider, raw_redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """A notification refused while the provider said ``pending`` is replayed once the
    provider says ``succeeded``; one naming an unknown plan is fixed and replayed with
    --body --no-verify; a second replay credits nothing more."""
    local = yookassa(settings, provider)
    user, payment, typo = new_user(), new_payment(), new_payment()
    provider.objects[f"payments/{payment}"] = payment_object(payment, user, "pro_month",
                                                             status="pending", units_chat="5")
    wrong_plan = payment_object(typo, user, "pro-month", units_chat="7")
    provider.objects[f"payments/{typo}"] = wrong_plan
    async with app_client(local, clock, address=YOOKASSA_ADDRESS) as http:
        first = await http.post(WEBHOOK, content=notification(
            "payment.succeeded", payment_object(payment, user, "pro_month")))
        assert first.status_code == 422
        second = await http.post(WEBHOOK, content=notification("payment.succeeded", wrong_plan))
        assert second.status_code == 422 and second.json()["error"]["code"] == "unknown_plan"
        ids = [first.json()["dead_letter_id"], second.json()["dead_letter_id"]]

        listed = await asyncio.to_thread(cli, local, provider, "list")
        assert listed.returncode == 0, listed.stderr
        assert set(ids) <= listed_ids(listed.stdout)
        shown = await asyncio.to_thread(cli, local, provider, "show", str(ids[1]))
        assert shown.returncode == 0, shown.stderr
        letter = orjson.loads(shown.stdout)
        assert letter["sender"] == YOOKASSA_ADDRESS and "unknown_plan" in letter["reason"]
        assert orjson.loads(letter["body"])["object"]["metadata"]["plan_code"] == "pro-month"

        still = await asyncio.to_thread(cli, local, provider, "replay", str(ids[0]))
        assert still.returncode == 1 and "status_mismatch" in still.stderr
        provider.objects[f"payments/{payment}"]["status"] = "succeeded"
        replayed = await asyncio.to_thread(cli, local, provider, "replay", str(ids[0]))
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.startswith("processed")
        assert await remain_chat(http, user) == 10_005

        fixed = letter["body"].replace("pro-month", "pro_month")
        body_file = tmp_path / "fixed.json"
        body_file.write_text(fixed)
        done = await asyncio.to_thread(cli, local, provider, "replay", str(ids[1]),
                                       "--body", str(body_file), "--no-verify")
        assert done.returncode == 0, done.stderr
        assert await remain_chat(http, user) == 10_012
        twice = await asyncio.to_thread(cli, local, provider, "replay", str(ids[1]),
                                        "--body", str(body_file), "--no-verify")
        assert twice.returncode == 0 and twice.stdout.startswith("duplicate")
        assert await remain_chat(http, user) == 10_012
        left = await asyncio.to_thread(cli, local, provider, "list")
        assert not set(ids) & listed_ids(left.stdout)
        everything = await asyncio.to_thread(cli, local, provider, "list", "--all")
        assert set(ids) <= listed_ids(everything.stdout)
