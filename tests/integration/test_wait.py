"""WAIT for replicas after writes (REDIS_WAIT_*), on a private primary with one replica:
acknowledged writes count no short WAIT; with the replica paused (SIGSTOP), a credit, a
plan assignment and (REDIS_WAIT_DEBITS) a debit are still answered as they should be, and
each short acknowledgement is counted in quota_redis_wait_short_total. A Redis without
replicas (the shared one) is never waited on."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.clock import FixedClock
from core.settings import Settings
from ops.cluster import cluster_port, redis_server_binary
from tests.payment_support import new_payment
from tests.support import (
    app_client,
    apply_plan,
    debit,
    new_user,
    put_plan,
    read_metric,
    unique_plan,
)

pytestmark = pytest.mark.single_redis  # starts servers of its own

WAITS, SHORT = "quota_redis_waits_total", "quota_redis_wait_short_total"


class Pair:
    """A redis-server primary and its replica (``--replicaof``), private to the test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = (cluster_port(), cluster_port())
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for i, port in enumerate(self.ports):
            data = self.folder / str(port)
            data.mkdir(parents=True)
            argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                    "--dir", str(data), "--save", "", "--appendonly", "no"]
            if i:
                argv += ["--replicaof", "127.0.0.1", str(self.ports[0])]
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        primary = redis.Redis(port=self.ports[0], decode_responses=True)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if primary.info("replication").get("connected_slaves") == 1:
                    replica = primary.info("replication")["slave0"]
                    if replica["state"] == "online":
                        break
            assert time.monotonic() < deadline, "the replica did not come online"
            time.sleep(0.05)
        primary.close()

    def pause_replica(self, paused: bool) -> None:
        os.kill(self.procs[1].pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


@pytest.fixture
def pair() -> Iterator[Pair]:
    with tempfile.TemporaryDirectory(prefix="qg-wait-") as tmp:
        servers = Pair(Path(tmp))
        try:
            servers.start()
            yield servers
        finally:
            servers.stop()


async def _counts(http: object, op: str) -> tuple[float, float]:
    return (await read_metric(http, WAITS, op=op),  # type: ignore[arg-type]
            await read_metric(http, SHORT, op=op))  # type: ignore[arg-type]


async def test_writes_wait_for_the_replica_and_a_paused_one_is_counted_short(
    settings: Settings, clock: FixedClock, pair: Pair
) -> None:
    # A second to acknowledge: a replica on a loaded 2-core host has been seen taking more
    # than 200 ms (the full suite failed on it once); a paused one still runs it out.
    on_pair = settings.with_overrides(redis_url=pair.url, redis_wait_debits=True,
                                      redis_wait_timeout_ms=1000)
    user, plan = new_user(), unique_plan()
    async with app_client(on_pair, clock) as http:
        await put_plan(http, plan, {"chat": {"limit": 1000, "period": "month"}})
        before = {op: await _counts(http, op) for op in ("set_plan", "apply_payment",
                                                         "debit_many")}
        await apply_plan(http, user, plan)
        credit = await http.post("/internal/billing/quota/credit", json={
            "order_id": f"o-{new_payment()}", "user_id": user, "plan_code": plan,
            "units_chat": 5, "units_tpl": 0})
        assert credit.status_code == 200 and credit.json()["applied"] is True, credit.text
        answer = await debit(http, user, 1)
        assert answer.status_code == 200, answer.text
        for op in ("set_plan", "apply_payment", "debit_many"):
            waits, short = await _counts(http, op)
            assert waits > before[op][0], op  # WAIT was sent after the write
            assert short == before[op][1], op  # and the replica acknowledged it

        pair.pause_replica(True)
        try:
            started = time.monotonic()
            other = unique_plan()
            await put_plan(http, other, {"chat": {"limit": 2000, "period": "month"}})
            await apply_plan(http, user, other)  # 200 all the same: PostgreSQL holds it
            credit = await http.post("/internal/billing/quota/credit", json={
                "order_id": f"o-{new_payment()}", "user_id": user, "plan_code": other,
                "units_chat": 7, "units_tpl": 0})
            assert credit.status_code == 200 and credit.json()["applied"] is True, credit.text
            answer = await debit(http, user, 1)
            assert answer.status_code == 200, answer.text  # the debit stands, counted short
            elapsed = time.monotonic() - started
            for op in ("set_plan", "apply_payment", "debit_many"):
                waits, short = await _counts(http, op)
                assert short > before[op][1], op
            check = (await http.get(f"/internal/billing/quota/check/{user}")).json()
            assert check["plan_code"] == other
            assert check["meters"]["chat"]["remaining"] == 2000 + 5 + 7 - 2
            assert elapsed >= 0.6  # three WAITs ran out their 200 ms
        finally:
            pair.pause_replica(False)


async def test_a_redis_without_replicas_is_not_waited_on(
    settings: Settings, clock: FixedClock
) -> None:
    """The shared test Redis has no replica: no WAIT is sent (it would block for nothing)."""
    user, plan = new_user(), unique_plan()
    async with app_client(settings.with_overrides(redis_wait_debits=True), clock) as http:
        await put_plan(http, plan, {"chat": {"limit": 10, "period": "month"}})
        before = await _counts(http, "set_plan"), await _counts(http, "debit_many")
        await apply_plan(http, user, plan)
        assert (await debit(http, user, 1)).status_code == 200
        assert (await _counts(http, "set_plan"), await _counts(http, "debit_many")) == before
