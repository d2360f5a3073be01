"""`quota-gateway user show ID`: one user's state in Redis next to PostgreSQL's (an
operator's answer to "why was this debit refused"), read by the real command."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from core.settings import Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import CREDIT, debit, new_ref, new_user

CLI = str(Path(sys.executable).with_name("quota-gateway"))


async def test_user_show_puts_redis_next_to_postgres(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, raw_redis: aioredis.Redis
) -> None:
    """A pro_month buyer with 5 chat credits, one debit flushed and one not: the command
    shows the same plan and credits on both sides, Redis's usage ahead by the unflushed
    debit, which it counts, and the two idempotency keys."""
    user = new_user()
    bought = await client.post(CREDIT, json={"order_id": new_ref(), "user_id": user,
                                             "plan_code": "pro_month", "units_chat": 5,
                                             "units_tpl": 0})
    assert bought.status_code == 200, bought.text
    assert (await debit(client, user, 3)).status_code == 200
    await Reconciler(engine, raw_redis, name="user-show").drain()
    assert (await debit(client, user, 2)).status_code == 200  # left unflushed

    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "DB_DSN": settings.db_dsn or "",
           "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards)}
    process = await asyncio.create_subprocess_exec(
        CLI, "user", "show", user, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    shown = json.loads(out)
    redis_side, pg_side = shown["redis"], shown["postgres"]
    assert redis_side["loaded"] and redis_side["plan"] == "pro_month"
    assert redis_side["plan_version"] == pg_side["plan"]["version"]
    assert redis_side["plan_start_ms"] == pg_side["plan"]["started_ms"]
    assert redis_side["credits"] == pg_side["credits"] == {"chat": "5"}
    [(period, used)] = redis_side["period_usage"].items()
    assert period.startswith("chat y:") and used == "5"  # the cycle counter: 3 + 2
    assert pg_side["usage"] == {period: "3"}  # the flushed debit only
    assert redis_side["unflushed_events"] == 1
    assert redis_side["idempotency_keys"] == 2
