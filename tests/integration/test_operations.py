"""What operators and callers rely on: catalog, metrics, spec, long-lived idempotency, poison."""

from __future__ import annotations

import httpx
import msgspec
import redis.asyncio as aioredis

from core.clock import FixedClock
from hotpath.results import (
    BalanceCheckOut,
    HealthOut,
    PlanOut,
    PlansOut,
    QuotaCheckOut,
    QuotaDebitErrorOut,
    QuotaDebitOut,
    ReadyOut,
)
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import (
    DAY_MS,
    apply_plan,
    debit,
    metric_value,
    new_ref,
    new_user,
    put_plan,
    unique_plan,
)


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


async def test_a_plan_change_that_missed_a_shard_reaches_it_with_the_reconciler(
    client: httpx.AsyncClient, engine: Engine, raw_redis: aioredis.Redis
) -> None:
    """A PUT whose copy to the shards failed half-way (committed: the caller got 200)
    leaves shards on the old rules; the reconciler's chores bring them to PostgreSQL's
    version."""
    code, user = unique_plan(), new_user()
    await put_plan(client, code, {"chat": {"limit": 3, "period": "day"}})
    await apply_plan(client, user, code)
    shard_copy = engine.keys.plans(engine.keys.shard(user))
    before = await raw_redis.hgetall(shard_copy)
    await put_plan(client, code, {"chat": {"limit": 5, "period": "day"}})
    await raw_redis.delete(shard_copy)  # this shard missed the new version
    await raw_redis.hset(shard_copy, mapping=before)
    assert (await debit(client, user, 5)).status_code == 403  # still the old limit
    reconciler = Reconciler(engine, raw_redis, name="catalog-test")
    await reconciler.chores()
    assert await raw_redis.hget(shard_copy, "~v") == str(
        await engine.db.fetchval("catalog_version"))
    assert (await debit(client, user, 5)).status_code == 200
    assert await engine.loader.resync_catalog() == 0  # nothing left behind


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
    """The spec lists every route with the models its answers are made from (a refused
    debit's extra fields, the query parameters included); real answers convert to them."""
    spec = (await client.get("/openapi.json")).json()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    for path, method in (("/internal/billing/plans", "get"),
                         ("/internal/billing/plans/{plan_code}", "put")):
        assert paths[path][method]["responses"]["200"]["content"]
    refused = paths["/internal/billing/quota/debit"]["post"]["responses"]["409"]
    ref = refused["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert {"error", "tx_id", "remaining"} <= set(schemas[ref]["properties"])
    assert [q["name"] for q in paths["/internal/billing/transactions"]["get"]["parameters"]] \
        == ["user_id", "limit", "before"]
    # amounts: read as a JSON number or its digits as a string, always written as a number
    assert schemas["QuotaDebitIn"]["properties"]["units"]["type"] == ["number", "string"]
    assert schemas["QuotaDebitOut"]["properties"]["remaining"]["type"] == "number"
    ready = paths["/ready"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReadyOut")
    assert set(schemas["ReadyOut"]["properties"]) == {"status", "checks"}
    msgspec.convert((await client.get("/ready")).json(), ReadyOut)
    msgspec.convert((await client.get("/health")).json(), HealthOut)
    user, ref_id = new_user(), new_ref()
    ok = await debit(client, user, 1, ref_id)
    msgspec.convert(ok.json(), QuotaDebitOut)
    again = await debit(client, user, 1, ref_id)
    assert msgspec.convert(again.json(), QuotaDebitErrorOut).tx_id == ok.json()["tx_id"]
    check = await client.get(f"/internal/billing/quota/check/{user}")
    msgspec.convert(check.json(), QuotaCheckOut)
    msgspec.convert((await client.get("/internal/billing/plans")).json(), PlansOut)
    plan = (await client.get("/internal/billing/plans/pro_month")).json()
    msgspec.convert(plan, PlanOut)


async def test_balance_answers_say_when_the_balance_renews(client: httpx.AsyncClient) -> None:
    """base750's units renew with the plan (a cycle of its 30 days): the balance and the
    pre-check give the plan's expiry; on free (units never renew) resets_at is null."""
    user = new_user()
    await apply_plan(client, user, "base750")
    balance = (await client.get("/internal/billing/balance", params={"user_id": user})).json()
    assert balance["balance"] == 750 and balance["resets_at"] == "2026-12-23T12:00:00Z"
    pre = await client.post("/internal/billing/check", json={"user_id": user, "units": 1})
    assert msgspec.convert(pre.json(), BalanceCheckOut).resets_at == "2026-12-23T12:00:00Z"
    free = (await client.get("/internal/billing/balance",
                             params={"user_id": new_user()})).json()
    assert free["resets_at"] is None and free["plan"]["plan_code"] == "free"


async def test_a_plan_put_back_with_its_version_is_refused_if_it_changed_since(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """GET, change, PUT with the version read: 200, recorded with the caller; a second PUT
    from the same (now stale) version is 409 naming the current one, and changes nothing;
    version 0 creates only a plan that does not exist."""
    code = unique_plan()
    created = await client.put(f"/internal/billing/plans/{code}", json={
        "meters": {"chat": {"limit": 1, "period": "day"}}, "version": 0})
    assert created.status_code == 200 and created.json()["updated_by"] == "service"
    read = (await client.get(f"/internal/billing/plans/{code}")).json()
    read["meters"]["chat"]["limit"] = 2
    changed = await client.put(f"/internal/billing/plans/{code}", json=read)
    assert changed.status_code == 200 and changed.json()["version"] > read["version"]
    read["meters"]["chat"]["limit"] = 3
    stale = await client.put(f"/internal/billing/plans/{code}", json=read)
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "version_conflict"
    assert stale.json()["version"] == changed.json()["version"]
    current = (await client.get(f"/internal/billing/plans/{code}")).json()
    assert current["meters"]["chat"]["limit"] == 2
    again = await client.put(f"/internal/billing/plans/{code}", json={
        "meters": {"chat": {"limit": 9, "period": "day"}}, "version": 0})
    assert again.status_code == 409
    assert (await client.put(f"/internal/billing/plans/{code}", json={
        "meters": {"chat": {"limit": 4, "period": "day"}}})).status_code == 200  # no check


async def test_metrics_count_outcomes_without_user_labels(client: httpx.AsyncClient) -> None:
    """A debit that fits and one that does not add exactly one to their outcome's counter
    and one latency sample each to the debit route's histogram (2xx and 4xx); the user id
    appears nowhere on the page (no label carries it)."""
    user = new_user()
    counted = [("quota_debits_total", {"meter": "chat", "result": "ok"}),
               ("quota_debits_total", {"meter": "chat", "result": "insufficient"}),
               ("quota_http_request_duration_seconds_count",
                {"route": "quota_debit", "status": "2xx"}),
               ("quota_http_request_duration_seconds_count",
                {"route": "quota_debit", "status": "4xx"})]
    page = (await client.get("/metrics")).text
    before = [metric_value(page, name, **labels) for name, labels in counted]
    assert (await debit(client, user, 50)).status_code == 200
    assert (await debit(client, user, 1)).status_code == 403
    page = (await client.get("/metrics")).text
    after = [metric_value(page, name, **labels) for name, labels in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
    assert user not in page


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
