"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import httpx

#: Tests pin the clock here unless they move it: Monday 2026-11-23 12:00:00 UTC.
T0 = int(datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp() * 1000)
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
KEY = "super-secret-dev"


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
