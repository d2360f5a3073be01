"""Plan assignments are written through: PostgreSQL commits first (with a ``redis_outbox``
row), then set_plan.lua applies the change to Redis. When the Redis step fails, the answer
says ``applied: false``, the assignment stays durable, and the reconciler applies the row
later, once it is older than ``outbox_min_age`` (left to the request until then).

The Redis step is made to fail by the exception the client raises when Redis is gone
(RedisUnavailable), for set_plan only, so the user's state stays readable in the real
Redis. The reconciler's pending-outbox query runs over every user of its database, so
these tests use a PostgreSQL of their own: other tests' pending rows are none of theirs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from lua.connection import RedisUnavailable
from ops.devservers import EmbeddedPostgres
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import app_client, debit, new_user


def refuse_set_plan(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every set_plan.lua call fail as if Redis were gone; returns the plan codes it
    refused (other scripts run as usual)."""
    refused: list[str] = []

    async def redis_gone(user_key: str, **kwargs: Any) -> int:
        refused.append(kwargs["plan_code"])
        raise RedisUnavailable("connection to Redis lost: test")

    monkeypatch.setattr(engine.rt.scripts, "set_plan", redis_gone)
    return refused


async def outbox_rows(engine: Engine, user: str) -> list[tuple[str, bool]]:
    """The user's outbox rows, oldest first: (plan code, applied)."""
    async with engine.db.connection() as conn:
        rows = await conn.fetch("SELECT payload, applied_at IS NOT NULL AS applied "
                                "FROM redis_outbox WHERE user_id = $1 ORDER BY id", user)
    return [(r["payload"]["plan_code"], r["applied"]) for r in rows]


async def plan_in_redis(raw_redis: aioredis.Redis, engine: Engine, user: str
                        ) -> tuple[str | None, int]:
    """The plan code and version the user's state hash holds."""
    plan, version = await raw_redis.hmget(engine.keys.user(user), ["plan", "pv"])
    return plan, int(version or 0)


async def check(http: httpx.AsyncClient, user: str) -> dict[str, Any]:
    response = await http.get(f"/internal/billing/quota/check/{user}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_plan_whose_redis_step_failed_is_applied_by_the_reconciler(
    settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis,
    private_postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pro_month applied while Redis refuses set_plan: 200 with ``applied: false``; the
    assignment is committed (the plan endpoint's PostgreSQL row and a pending outbox row)
    while Redis still holds the free plan and enforces it. The reconciler leaves a row
    younger than its outbox_min_age to the request; past it, one reconciler step applies
    it: Redis holds pro_month at the committed version, the row is marked applied, debits
    get pro_month's allowance, and a further step applies nothing."""
    local = settings.with_overrides(db_dsn=private_postgres.dsn)
    user = new_user()
    async with app_client(local, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        assert (await check(http, user))["plan_code"] == "free"  # loaded from PostgreSQL
        refused = refuse_set_plan(engine, monkeypatch)
        response = await http.post("/internal/billing/plan/apply",
                                   json={"user_id": user, "plan_code": "pro_month"})
        assert response.status_code == 200, response.text
        assert response.json()["applied"] is False
        assert response.json()["plan_code"] == "pro_month"
        assert refused == ["pro_month"]
        monkeypatch.undo()  # Redis answers again

        async with engine.db.connection() as conn:
            committed = await conn.fetchrow(
                "SELECT plan_code, version FROM user_plans WHERE user_id = $1", user)
        assert committed["plan_code"] == "pro_month"
        assert await outbox_rows(engine, user) == [("pro_month", False)]
        assert await plan_in_redis(raw_redis, engine, user) == ("free", 0)
        assert (await check(http, user))["plan_code"] == "free"
        assert (await debit(http, user, 51)).status_code == 403  # free's 50 a day

        reconciler = Reconciler(engine, raw_redis, name="outbox-consumer")
        reconciler.outbox_min_age = timedelta(hours=1)  # younger: the request's own
        assert await reconciler.apply_pending_outbox() == 0
        assert await outbox_rows(engine, user) == [("pro_month", False)]

        reconciler.outbox_min_age = timedelta(0)
        await reconciler.step()
        assert reconciler.stats.outbox_applied == 1
        assert await outbox_rows(engine, user) == [("pro_month", True)]
        assert await plan_in_redis(raw_redis, engine, user) == (
            "pro_month", committed["version"])
        after = await check(http, user)
        assert (after["plan_code"], after["remain_chat"]) == ("pro_month", 10_000)
        spent = await debit(http, user, 51)
        assert spent.status_code == 200 and spent.json()["remaining"] == 10_000 - 51
        assert await reconciler.apply_pending_outbox() == 0


async def test_a_late_outbox_apply_never_replaces_a_newer_assignment(
    settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis,
    private_postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row of an assignment whose Redis step failed is applied by the reconciler only
    after a newer assignment reached Redis: set_plan.lua compares versions, so Redis keeps
    the newer plan (as PostgreSQL does), and the old row is still marked applied, not
    retried for ever."""
    local = settings.with_overrides(db_dsn=private_postgres.dsn)
    user = new_user()
    async with app_client(local, clock) as http:
        engine: Engine = http.engine  # type: ignore[attr-defined]
        assert (await check(http, user))["plan_code"] == "free"
        refuse_set_plan(engine, monkeypatch)
        first = await http.post("/internal/billing/plan/apply",
                                json={"user_id": user, "plan_code": "pro_month"})
        assert first.status_code == 200 and first.json()["applied"] is False, first.text
        monkeypatch.undo()
        second = await http.post("/internal/billing/plan/apply",
                                 json={"user_id": user, "plan_code": "base750"})
        assert second.status_code == 200 and second.json()["applied"] is True, second.text
        newer = await plan_in_redis(raw_redis, engine, user)
        assert newer[0] == "base750"

        reconciler = Reconciler(engine, raw_redis, name="outbox-consumer")
        reconciler.outbox_min_age = timedelta(0)
        assert await reconciler.apply_pending_outbox() == 1
        assert await outbox_rows(engine, user) == [("pro_month", True), ("base750", True)]
        assert await plan_in_redis(raw_redis, engine, user) == newer
        assert (await check(http, user))["plan_code"] == "base750"
