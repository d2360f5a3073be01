"""Checks go out batched (check_many.lua): many users' checks in one call, each answered
on its own, as if alone. Against the real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from core.clock import FixedClock
from core.errors import DependencyUnavailable
from core.settings import Settings
from quota.engine import Engine
from tests.support import app_client, apply_plan, debit, new_user, put_plan, unique_plan


async def test_concurrent_checks_of_many_users_answer_each_its_own(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """40 users (half on pro_month with some usage, half never seen: loaded mid-batch),
    200 concurrent checks of all meters and of one: each equals the user's check alone."""
    paid, unseen = [new_user() for _ in range(20)], [new_user() for _ in range(20)]
    for i, user in enumerate(paid):
        await apply_plan(client, user, "pro_month")
        assert (await debit(client, user, i + 1)).status_code == 200
    users = paid + unseen
    answers = await asyncio.gather(*(
        engine.check(users[i % 40], None if i % 2 else ["chat"]) for i in range(200)))
    for i, answer in enumerate(answers):
        alone = await engine.check(users[i % 40], None if i % 2 else ["chat"])
        assert answer == alone, (users[i % 40], answer, alone)
    chat = {v.meter: v for v in answers[0].meters}["chat"]
    assert (answers[0].plan_code, chat.used) == ("pro_month", 1_000_000)
    assert {v.meter: v for v in answers[21].meters}["chat"].used == 0  # an unseen user


async def test_a_full_check_answers_the_same_meters_whichever_worker_answers(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, clock: FixedClock
) -> None:
    """GET /quota/check answers the engine's check meters and every other meter of the
    user's plan, after them in the plan's order; not the meters of plans the worker has
    seen (a worker that had copied the catalog once answered every meter of every plan,
    another worker fewer)."""
    plan, extra = unique_plan(), f"m{unique_plan()}"
    await put_plan(client, plan, {"chat": {"limit": 5, "period": "day"},
                                  extra: {"limit": 3, "period": "month"}})
    paid, free = new_user(), new_user()
    await apply_plan(client, paid, plan)
    await engine.loader.sync_catalog()  # this worker has seen every plan's meters
    defaults = list(engine.check_meters)
    free_plan = (await client.get(f"/internal/billing/plans/{settings.default_plan}")
                 ).json()["meters"]
    assert extra not in defaults and "chat" in defaults
    async with app_client(settings, clock) as other:  # a worker that has not
        for worker in (client, other):
            paid_meters = (await worker.get(f"/internal/billing/quota/check/{paid}")).json()
            assert list(paid_meters["meters"]) == [*defaults, extra]
            assert paid_meters["meters"][extra]["limit"] == 3
            free_meters = list((await worker.get(
                f"/internal/billing/quota/check/{free}")).json()["meters"])
            assert free_meters[:len(defaults)] == defaults and extra not in free_meters
            assert set(free_meters) == set(defaults) | set(free_plan)


async def test_users_loaded_together_fail_together_and_load_again(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loads of one moment share one read of PostgreSQL (Loader._read_states): when it
    fails, every load waiting on it fails with it (503, nothing written), and the next
    attempt reads again."""
    users = [new_user() for _ in range(30)]
    reads: list[int] = []
    fetch = engine.db.fetch

    async def failing(name: str, *args: object) -> object:
        if name == "user_load_state":
            reads.append(len(args[0]))  # type: ignore[arg-type]
            raise DependencyUnavailable("postgres", "down for the test")
        return await fetch(name, *args)

    monkeypatch.setattr(engine.db, "fetch", failing)
    answers = await asyncio.gather(*(engine.check(u, ["chat"]) for u in users),
                                   return_exceptions=True)
    assert all(isinstance(a, DependencyUnavailable) for a in answers), answers
    assert reads and sum(reads) == len(users) and len(reads) < len(users)  # read together
    monkeypatch.setattr(engine.db, "fetch", fetch)
    again = await asyncio.gather(*(engine.check(u, ["chat"]) for u in users))
    assert all(a.plan_code == "free" for a in again)
