"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from core import refs
from core.clock import FixedClock
from core.settings import Settings
from hotpath.app import build_app
from lua.cluster import hot_path_client
from lua.keys import Keys
from persistence.db import Database
from persistence.migrate import migrate
from persistence.plans import read_catalog_file, seed_missing
from quota.engine import Engine, wait_policy

#: Tests pin the clock here unless they move it: Monday 2026-11-23 12:00:00 UTC.
T0 = int(datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp() * 1000)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
KEY = "super-secret-dev"
CREDIT = "/internal/billing/quota/credit"
WEBHOOK = "/internal/billing/webhook/payment"


def new_user() -> str:
    """A user id no other test uses."""
    return f"user-{secrets.token_hex(6)}"


def new_ref() -> str:
    """A ref no other request uses."""
    return f"ref-{secrets.token_hex(8)}"


async def debit(client: httpx.AsyncClient, user: str, units: Any, ref: str | None = None,
                action: str = "chat_tokens") -> httpx.Response:
    """POST a seed-000 debit."""
    body = {"user_id": user, "action": action, "units": units, "ref": ref or new_ref()}
    return await client.post("/internal/billing/quota/debit", json=body)


async def balance_debit(client: httpx.AsyncClient, user: str, units: Any,
                        ref: str | None = None, reason: str = "test") -> httpx.Response:
    """POST a seed-002 debit of the balance meter."""
    body = {"user_id": user, "units": units, "ref": ref or new_ref(), "reason": reason}
    return await client.post("/internal/billing/debit", json=body)


async def apply_plan(client: httpx.AsyncClient, user: str, plan: str, **extra: Any
                     ) -> httpx.Response:
    """Assign a plan and insist it worked."""
    response = await client.post("/internal/billing/plan/apply",
                                 json={"user_id": user, "plan_code": plan, **extra})
    assert response.status_code == 200, response.text
    return response


async def put_plan(client: httpx.AsyncClient, code: str, meters: dict[str, Any],
                   duration_days: int | None = 30) -> httpx.Response:
    """Create a plan and insist it worked."""
    response = await client.put(f"/internal/billing/plans/{code}", json={
        "meters": meters, "duration_days": duration_days, "price": "10.00", "currency": "RUB"})
    assert response.status_code == 200, response.text
    return response


def unique_plan() -> str:
    """A plan code no other test uses."""
    return f"t{secrets.token_hex(5)}"


async def prepare_database(dsn: str) -> None:
    """Apply the migrations and seed the plan catalog, as `quota-gateway migrate` does."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    db = Database(dsn, min_size=0, max_size=2, timeout=10)
    await seed_missing(db, read_catalog_file())
    await db.close()


def make_engine(settings: Settings, clock: FixedClock) -> Engine:
    """An engine on the test's servers (closed by the caller)."""
    assert settings.redis_url and settings.db_dsn
    redis = hot_path_client(settings.redis_url, timeout_seconds=settings.redis_timeout_seconds,
                            connect_timeout_seconds=2.0, wait=wait_policy(settings))
    db = Database(settings.db_dsn, min_size=0, max_size=5, timeout=settings.db_timeout_seconds)
    return Engine(settings, redis, db, clock)


@contextlib.asynccontextmanager
async def app_client(settings: Settings, clock: FixedClock, key: str = KEY, *,
                     address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client for an app on ``settings``, its requests coming from
    ``address``; its engine is closed afterwards."""
    engine = make_engine(settings, clock)
    app = build_app(settings, engine, owns_resources=False)
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    try:
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://q", headers={"X-Internal-Key": key}
                                     ) as http:
            http.engine = engine  # type: ignore[attr-defined]  # for tests that inspect it
            yield http
    finally:
        await app.state.api.webhook.verifier.aclose()
        await engine.close()


def metric_value(text: str, sample: str, **labels: str) -> float:
    """The value of one sample (its full name, e.g. ``quota_debits_total``, and exactly
    these labels) in a Prometheus text page; 0 when the page has no such sample yet (a
    counter or labelled child appears only once it has been touched)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return 0.0


async def read_metric(http: httpx.AsyncClient, sample: str, **labels: str) -> float:
    """``metric_value`` of the app's /metrics page right now."""
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    return metric_value(response.text, sample, **labels)


async def ref_bucket(raw_redis: Any, keys: Keys, user_id: str, ref: str) -> str | None:
    """The idempotency bucket that holds the record of (user, ref), or None (whatever its
    life left: the script judges that by its stamp)."""
    field = refs.ref_hash(user_id, ref)[:refs.FIELD_BYTES]
    async for key in raw_redis.scan_iter(match=f"{keys.refs(user_id)}:*", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        if await raw_redis.execute_command("HEXISTS", name, field):
            return str(name)
    return None


async def forget_ref(raw_redis: Any, keys: Keys, user_id: str, ref: str) -> int:
    """Drop the record of (user, ref) from its bucket, as a Redis that lost it would have;
    1 if there was one."""
    bucket = await ref_bucket(raw_redis, keys, user_id, ref)
    if bucket is None:
        return 0
    field = refs.ref_hash(user_id, ref)[:refs.FIELD_BYTES]
    return int(await raw_redis.execute_command("HDEL", bucket, field))


def ref_granularity_ms(settings: Settings) -> int:
    """How much longer than IDEMPOTENCY_TTL_SECONDS a ref may be remembered (its stamp's
    unit, lua/_common.lua)."""
    return settings.idempotency_ttl_seconds * 1000 // 65535 + 1
