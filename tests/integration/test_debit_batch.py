"""Batch debits (issue #21): one request, one answer per item in order, each item exactly
the debit a single request would have made (atomic, idempotent on its ref); a bad item
gets its own 4xx entry without failing the others."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx

from core.settings import Settings
from quota.engine import Engine
from tests.support import debit, new_ref, new_user

BATCH = "/internal/billing/quota/debit/batch"


def item(user: str, units: Any = 1, ref: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "action": "chat_tokens", "units": units,
            "ref": ref or new_ref(), **extra}


async def test_mixed_items_are_answered_one_by_one(client: httpx.AsyncClient) -> None:
    """A valid debit, a duplicate of an earlier debit, one beyond the allowance and four
    invalid items: 200, 409 (the original tx), 403, 422 naming each field; sending the same
    batch again debits nothing more."""
    user, poor = new_user(), new_user()
    earlier_ref = new_ref()
    earlier = await debit(client, user, 2, ref=earlier_ref)
    assert earlier.status_code == 200
    items = [item(user, 3), item(user, 2, earlier_ref), item(poor, 51), item(user, 0),
             item(user, 1, action="mine_bitcoin"), {"user_id": user, "units": 1},
             item(user, 1, extra_field=True)]
    response = await client.post(BATCH, json={"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 409, 403, 422, 422, 422, 422]
    assert results[0]["body"]["remaining"] == 45  # 50 - 2 - 3
    assert results[1]["body"]["tx_id"] == earlier.json()["tx_id"]
    assert results[2]["body"]["error"]["code"] == "insufficient_quota"
    assert [r["body"]["error"]["field"] for r in results[3:]] == [
        "units", "action", "action", "extra_field"]
    again = (await client.post(BATCH, json={"items": items})).json()["results"]
    assert [r["status"] for r in again] == [409, 409, 403, 422, 422, 422, 422]
    assert again[0]["body"]["tx_id"] == results[0]["body"]["tx_id"]
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["remain_chat"] == 45


async def test_a_batch_never_over_debits(client: httpx.AsyncClient) -> None:
    """100 debits of 1 against the free plan's 50: exactly 50 pass, 50 are refused, the
    meter ends at 0."""
    user = new_user()
    response = await client.post(BATCH, json={"items": [item(user) for _ in range(100)]})
    statuses = Counter(r["status"] for r in response.json()["results"])
    assert statuses == {200: 50, 403: 50}
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["remain_chat"] == 0


async def test_batch_limits(client: httpx.AsyncClient, settings: Settings,
                            engine: Engine) -> None:
    """More than BATCH_MAX_ITEMS, none, or no items list: 422 for the whole request."""
    too_many = [item(new_user()) for _ in range(settings.batch_max_items + 1)]
    for body, field in (({"items": too_many}, "items"), ({"items": []}, "items"),
                        ({}, "items"), ({"items": [], "x": 1}, "x")):
        response = await client.post(BATCH, json=body)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == field
    assert await engine.redis.execute("EXISTS", engine.keys.user(too_many[0]["user_id"])) == 0
