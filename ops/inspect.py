"""`quota-gateway user show ID`: one user's state in Redis next to PostgreSQL's, for an
operator answering "why was this debit refused"."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from core.amounts import format_micro
from core.clock import to_ms
from core.events import BadEvent, unpack
from quota.engine import Engine

#: Stream entries read per shard when counting a user's unflushed events.
STREAM_PAGE = 1000


async def user_state(engine: Engine, redis: aioredis.Redis, user_id: str) -> dict[str, Any]:
    """The user's plan, credits, period usage, unflushed events and remembered refs
    (idempotency records, those past their TTL included until their bucket expires), as
    Redis holds them and as PostgreSQL does."""
    keys = engine.keys
    user_key = keys.user(user_id)
    state: dict[str, str] = await redis.hgetall(user_key)  # type: ignore[assignment]
    counters = {}
    async for key in redis.scan_iter(match=f"{user_key}:c:*", count=1000):
        parsed = keys.parse_counter(key)
        if parsed is not None:
            counters[f"{parsed[1]} {parsed[2]}"] = format_micro(int(await redis.get(key) or 0))
    refs = 0  # records in the user's ref buckets (each bucket also holds its '' marker)
    async for key in redis.scan_iter(match=f"{keys.refs(user_id)}:*", count=1000):
        refs += max(0, int(await redis.hlen(key)) - 1)
    ttl_ms = await redis.pttl(user_key)
    unflushed = await _unflushed(redis, keys.ledger(keys.shard(user_id)), user_id)
    plan = await engine.db.fetchrow("get_user_plan", user_id)
    credits = await engine.db.fetch("user_credits", user_id)
    periods = list(counters) and sorted({c.split(" ", 1)[1] for c in counters} | {"n"})
    usage = await engine.db.fetch("user_usage", user_id, periods or ["n"])
    return {
        "user_id": user_id, "shard": keys.shard(user_id),
        "redis": {
            "loaded": bool(state.get("loaded")), "ttl_seconds": ttl_ms / 1000 if ttl_ms > 0
            else None, "plan": state.get("plan"), "expires_ms": _int(state.get("exp")),
            "plan_version": _int(state.get("pv")), "plan_start_ms": _int(state.get("ps")),
            "credits": {k[3:]: format_micro(int(v)) for k, v in state.items()
                        if k.startswith("cr:")},
            "lifetime_usage": {k[2:]: format_micro(int(v)) for k, v in state.items()
                               if k.startswith("n:")},
            "period_usage": counters, "idempotency_keys": refs,
            "unflushed_events": unflushed,
        },
        "postgres": {
            "plan": None if plan is None else {
                "plan_code": plan["plan_code"], "version": plan["version"],
                "started_ms": to_ms(plan["started_at"]),
                "expires_ms": to_ms(plan["expires_at"]) if plan["expires_at"] else None},
            "credits": {r["meter"]: format_micro(r["balance_micro"]) for r in credits},
            "usage": {f"{r['meter']} {r['period_id']}": format_micro(r["used_micro"])
                      for r in usage},
        },
    }


def _int(value: str | None) -> int | None:
    return int(value) if value else None


async def _unflushed(redis: aioredis.Redis, stream: str, user_id: str) -> int:
    """The user's entries still in its shard's stream (not flushed yet)."""
    count, start = 0, "-"
    while True:
        page: list[tuple[str, dict[str, str]]] = await redis.xrange(  # type: ignore[assignment]
            stream, min=start, max="+", count=STREAM_PAGE)
        for _, fields in page:
            try:
                if unpack(fields).get("u") == user_id:
                    count += 1
            except BadEvent:
                continue
        if len(page) < STREAM_PAGE:
            return count
        start = "(" + page[-1][0]
