"""Loading a user from PostgreSQL races write-throughs: a load that read PostgreSQL before
another worker's plan or credit reached Redis is refused by load_user.lua (the ``wg``
write generation moved on) and read again, so the user is loaded once, with the change.

The interleaving is forced, not hoped for: the first load_user.lua call of the loading
engine is held until another app (another worker, on the same servers) has committed its
change and written it through to Redis; only then does the held call run, with the
generation and the PostgreSQL rows it read before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from core import metrics
from core.clock import FixedClock
from core.settings import Settings
from quota.engine import Engine
from tests.support import CREDIT, app_client, debit, new_user, unique_plan

#: Each argument load_user.lua was called with that the tests look at, and its answer.
Call = dict[str, Any]


def hold_first_load(engine: Engine, monkeypatch: pytest.MonkeyPatch,
                    meanwhile: Callable[[], Awaitable[None]]) -> list[Call]:
    """Make ``engine``'s first load_user.lua call wait until ``meanwhile`` has run (after
    the loader read PostgreSQL, before the script runs); record every call and answer."""
    calls: list[Call] = []
    scripts = engine.rt.scripts
    load_user = scripts.load_user

    async def interleaved(user_key: str, **kwargs: Any) -> tuple[int, int]:
        if not calls:
            await meanwhile()
        call = {name: kwargs[name] for name in ("generation", "plan_code", "plan_version")}
        call["credits"] = list(kwargs["credits"])
        answer = await load_user(user_key, **kwargs)
        calls.append({**call, "answer": answer[0]})
        return answer

    monkeypatch.setattr(scripts, "load_user", interleaved)
    return calls


async def test_a_load_refused_by_a_plan_applied_mid_load_reads_again(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, clock: FixedClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan applied by another worker between the loader's PostgreSQL read and its
    load_user.lua call bumps ``wg``: the script answers -1, the loader reads PostgreSQL
    again (the second call carries the new generation and the new plan and version) and
    loads the user once (quota_user_loads_total + 1); the debit that asked for the load
    is counted against the new plan."""
    user, plan = new_user(), unique_plan()
    put = await client.put(f"/internal/billing/plans/{plan}", json={
        "meters": {"chat": {"limit": 7, "period": "day"}}, "duration_days": 30,
        "price": "10.00", "currency": "RUB"})
    assert put.status_code == 200, put.text
    applied: list[dict[str, Any]] = []

    async def other_worker_applies_the_plan() -> None:
        async with app_client(settings, clock) as other:
            response = await other.post("/internal/billing/plan/apply",
                                        json={"user_id": user, "plan_code": plan})
            assert response.status_code == 200, response.text
            applied.append(response.json())

    calls = hold_first_load(engine, monkeypatch, other_worker_applies_the_plan)
    loads = metrics.USER_LOADS._value.get()
    first = await debit(client, user, 2)
    assert first.status_code == 200, first.text
    assert applied and applied[0]["applied"] is True  # written through while the load waited
    assert [(c["generation"], c["plan_code"], c["answer"]) for c in calls] == [
        ("0", settings.default_plan, -1), ("1", plan, 1)]
    assert calls[0]["plan_version"] == 0 and calls[1]["plan_version"] >= 1
    assert metrics.USER_LOADS._value.get() == loads + 1
    assert first.json()["plan_code"] == plan and first.json()["remaining"] == 5
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert (check["plan_code"], check["meters"]["chat"]["remaining"]) == (plan, 5)


async def test_a_load_refused_by_a_credit_mid_load_counts_the_credit_once(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, clock: FixedClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the refusal matters most: a credit committed by another worker while the load
    was reading finds the user not loaded, so apply_payment.lua adds nothing (the load is
    to bring it from PostgreSQL), marks its outbox row applied and bumps ``wg``. The load's
    rows predate the credit; had load_user.lua accepted them the 500 credits would be lost
    for good. It refuses, the loader reads again, and the credit counts exactly once."""
    user = new_user()
    credited: list[dict[str, Any]] = []

    async def other_worker_credits() -> None:
        async with app_client(settings, clock) as other:
            response = await other.post(CREDIT, json={
                "order_id": f"o-{new_user()}", "user_id": user, "plan_code": "pro_month",
                "units_chat": 500})
            assert response.status_code == 200, response.text
            credited.append(response.json())

    calls = hold_first_load(engine, monkeypatch, other_worker_credits)
    loads = metrics.USER_LOADS._value.get()
    first = await debit(client, user, 1)
    assert first.status_code == 200, first.text
    assert credited and credited[0]["applied"] is True
    assert [(c["plan_code"], c["credits"], c["answer"]) for c in calls] == [
        (settings.default_plan, [], -1), ("pro_month", [("chat", 500_000_000)], 1)]
    assert metrics.USER_LOADS._value.get() == loads + 1
    check = (await client.get(f"/internal/billing/quota/check/{user}")).json()
    assert check["plan_code"] == "pro_month"
    assert check["meters"]["chat"]["credits"] == 500
    assert check["remain_chat"] == 10_000 + 500 - 1
