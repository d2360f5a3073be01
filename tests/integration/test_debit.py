"""Debits over HTTP against real Redis and PostgreSQL: quotas, exactness, idempotency."""

from __future__ import annotations

import asyncio

import httpx

from tests.support import apply_plan, balance_debit, debit, new_ref, new_user, put_plan, unique_plan


async def test_free_plan_daily_chat_quota_is_enforced(client: httpx.AsyncClient) -> None:
    """A new user gets the free plan's 50 chat units a day and no more."""
    user = new_user()
    first = await debit(client, user, 49)
    assert first.status_code == 200, first.text
    assert first.json()["remaining"] == 1
    assert first.json()["plan_code"] == "free"
    over = await debit(client, user, 2)
    assert over.status_code == 403
    assert over.json()["error"]["code"] == "insufficient_quota"
    assert over.json()["remaining"] == 1
    last = await debit(client, user, 1)
    assert last.status_code == 200
    assert last.json()["remaining"] == 0


async def test_fractional_amounts_are_exact(client: httpx.AsyncClient) -> None:
    """0.1 + 0.2 debited leaves exactly 0.3 less: no float on the way to Redis."""
    user = new_user()
    plan = unique_plan()
    await put_plan(client, plan, {"units": {"limit": 1, "period": "month"}})
    await apply_plan(client, user, plan)
    assert (await balance_debit(client, user, 0.1)).json()["balance"] == 0.9
    after = await balance_debit(client, user, 0.2)
    assert after.status_code == 200
    assert after.content.count(b'"balance":0.7') == 1  # the exact text, not 0.7000000000000001
    rest = await balance_debit(client, user, "0.7")
    assert rest.json()["balance"] == 0
    assert (await balance_debit(client, user, 0.000001)).status_code == 403


async def test_concurrent_debits_never_go_below_zero(client: httpx.AsyncClient) -> None:
    """500 concurrent debits of 1 against 100 remaining accept exactly 100."""
    user = new_user()
    plan = unique_plan()
    await put_plan(client, plan, {"units": {"limit": 100, "period": "month"}})
    await apply_plan(client, user, plan)
    results = await asyncio.gather(*(balance_debit(client, user, 1) for _ in range(500)))
    codes = [r.status_code for r in results]
    assert codes.count(200) == 100
    assert codes.count(403) == 400
    balance = await client.get("/internal/billing/balance", params={"user_id": user})
    assert balance.json()["balance"] == 0
    assert sorted(r.json()["balance"] for r in results if r.status_code == 200) == list(range(100))


async def test_one_ref_debits_once_under_concurrency(client: httpx.AsyncClient) -> None:
    """50 concurrent debits with one ref debit once; the others get 409 with the same tx."""
    user = new_user()
    ref = new_ref()
    results = await asyncio.gather(*(debit(client, user, 1, ref) for _ in range(50)))
    ok = [r for r in results if r.status_code == 200]
    dup = [r for r in results if r.status_code == 409]
    assert len(ok) == 1 and len(dup) == 49
    tx = ok[0].json()["tx_id"]
    assert {r.json()["tx_id"] for r in dup} == {tx}
    assert {r.json()["remaining"] for r in dup} == {49}
    assert all(r.json()["error"]["code"] == "duplicate_ref" for r in dup)
    check = await client.get(f"/internal/billing/quota/check/{user}")
    assert check.json()["remain_chat"] == 49


async def test_ref_reused_with_other_content_is_422(client: httpx.AsyncClient) -> None:
    """The same ref with another amount, meter or reason is refused and changes nothing."""
    user = new_user()
    ref = new_ref()
    assert (await debit(client, user, 1, ref)).status_code == 200
    for response in (
        await debit(client, user, 2, ref),
        await debit(client, user, 1, ref, action="tpl_run"),
    ):
        assert response.status_code == 422
        assert response.json()["error"] == {
            "code": "ref_reused", "field": "ref",
            "message": "this ref was already used with another amount, meter or reason"}
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["remain_chat"] == 49 and check["remain_tpl"] == 5
    other = new_user()
    assert (await balance_debit(client, other, 1, ref, reason="a")).status_code == 403
    # Another reason alone is reuse too (seed 002's debit carries one).
    payer, plan = new_user(), unique_plan()
    await put_plan(client, plan, {"units": {"limit": 10, "period": "month"}})
    await apply_plan(client, payer, plan)
    assert (await balance_debit(client, payer, 1, ref, reason="a")).status_code == 200
    reused = await balance_debit(client, payer, 1, ref, reason="b")
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "ref_reused"
    repeat = await balance_debit(client, payer, 1, ref, reason="a")
    assert repeat.status_code == 409 and repeat.json()["balance"] == 9
