"""What operators and callers rely on: catalog, metrics, spec, long-lived idempotency, poison."""

from __future__ import annotations

import httpx
import msgspec
import redis.asyncio as aioredis

from hotpath.clock import FixedClock
from hotpath.quota import Engine
from hotpath.schemas import QuotaCheckOut, QuotaDebitOut
from reconciler.main import Reconciler
from tests.support import DAY_MS, apply_plan, debit, new_ref, new_user, put_plan, unique_plan


async def test_plan_catalog_reads_and_writes(client: httpx.AsyncClient) -> None:
    """PUT creates a plan in the seed's format, GET returns it, users can be given it."""
    code = unique_plan()
    meters = {"chat": {"limit": 3, "period": "day"}, "qr_codes": {"limit": 2.5, "period": "none"}}
    stored = (await put_plan(client, code, meters)).json()
    assert stored["meters"] == meters and stored["price"] == "10.00"
    assert (await client.get(f"/internal/billing/plans/{code}")).json()["meters"] == meters
    listed = (await client.get("/internal/billing/plans")).json()["plans"]
    assert {"free", "base750", "pro_month", code} <= {p["plan_code"] for p in listed}
    user = new_user()
    await apply_plan(client, user, code)
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["meters"]["qr_codes"]["remaining"] == 2.5  # a meter that is only data
    # Raising the limit applies at once to users already on the plan.
    await put_plan(client, code, {**meters, "chat": {"limit": 5, "period": "day"}})
    assert (await debit(client, user, 5)).status_code == 200


async def test_a_ref_retried_a_day_later_is_still_a_duplicate(
    client: httpx.AsyncClient, clock: FixedClock
) -> None:
    """Within the idempotency TTL (7 days) a retry never debits again, even a new day."""
    user = new_user()
    ref = new_ref()
    first = await debit(client, user, 1, ref)
    clock.advance(DAY_MS + 1)
    again = await debit(client, user, 1, ref)
    assert again.status_code == 409 and again.json()["tx_id"] == first.json()["tx_id"]
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["remain_chat"] == 50  # the new day's allowance is untouched


async def test_responses_match_the_published_spec(client: httpx.AsyncClient) -> None:
    """The spec lists every route; real answers convert to the models it was built from."""
    spec = (await client.get("/openapi.json")).json()
    assert "/internal/billing/quota/debit" in spec["paths"]
    assert spec["paths"]["/internal/billing/quota/debit"]["post"]["responses"]["409"]
    user = new_user()
    ok = await debit(client, user, 1)
    msgspec.convert(ok.json(), QuotaDebitOut)
    check = await client.get(f"/internal/billing/quota/check/{user}")
    msgspec.convert(check.json(), QuotaCheckOut)


async def test_metrics_count_outcomes_without_user_labels(client: httpx.AsyncClient) -> None:
    """Debit outcomes and latencies per route are exported; no label carries a user id."""
    user = new_user()
    await debit(client, user, 50)
    await debit(client, user, 1)
    text = (await client.get("/metrics")).text
    assert 'quota_debits_total{meter="chat",result="ok"}' in text
    assert 'quota_debits_total{meter="chat",result="insufficient"}' in text
    assert 'quota_http_request_duration_seconds_bucket{le="0.005",route="quota_debit"' in text
    assert user not in text


async def test_a_foreign_stream_entry_goes_to_poison_not_the_ledger(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """A corrupt entry is set aside with its error; the good ones around it are flushed."""
    user = new_user()
    assert (await debit(client, user, 1)).status_code == 200
    stream = engine.keys.ledger(engine.keys.shard(user))
    await raw_redis.xadd(stream, {"e": "v1\x1fdebit\x1fnot-a-uuid"})
    assert (await debit(client, user, 1)).status_code == 200
    reconciler = Reconciler(engine, raw_redis, name="poison-test")
    await reconciler.drain()
    assert (reconciler.stats.inserted, reconciler.stats.poisoned) == (2, 1)
    async with engine.db.connection() as conn:
        row = await conn.fetchrow("SELECT error, fields FROM poison_events WHERE shard = $1",
                                  engine.keys.shard(user))
    assert row is not None and "unknown event layout" in row["error"]
    assert await raw_redis.xlen(stream) == 0
