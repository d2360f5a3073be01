"""Processes as deployed: ``serve --workers 2`` and two ``reconcile`` processes side by side
(docker-compose.yml's shape), their Prometheus metrics, and graceful shutdown under load.

Real subprocesses of the command against the test's Redis key prefix and database; the
load and the ledger check are test_faults.py's (every debit answered 200 is in the ledger
exactly once, and nothing else).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.multiprocess import MultiProcessCollector

from core.settings import Settings
from ops.devservers import free_port
from tests.integration.test_faults import (
    Load,
    assert_ledger_exact,
    eventually,
    log_tail,
    spawn,
    stop_process,
    stream_keys,
    streams,
    wait_drained,
    wait_exit,
)
from tests.support import KEY, metric_value, new_user

pytestmark = pytest.mark.slow


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The test's random generator; its seed is printed (pytest shows it on failure)."""
    seed = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{request.node.name}: random seed {seed} (replay with FAULT_SEED={seed})")
    return random.Random(seed)


def per_process_debits(directory: Path) -> dict[str, float]:
    """Accepted debits counted by each process of a PROMETHEUS_MULTIPROC_DIR (file name ->
    its quota_debits_total{result="ok"} summed over meters)."""
    counted = {}
    for path in sorted(directory.glob("counter_*.db")):
        total = 0.0
        for family in MultiProcessCollector.merge([str(path)], accumulate=True):
            total += sum(s.value for s in family.samples
                         if s.name == "quota_debits_total" and s.labels.get("result") == "ok")
        counted[path.name] = total
    return counted


async def scrape(http: httpx.AsyncClient, url: str) -> str:
    response = await http.get(url)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.timeout(240)
async def test_workers_and_reconcilers_report_metrics_and_stop_gracefully_under_load(
    settings: Settings, raw_redis: aioredis.Redis, rng: random.Random, tmp_path: Path,
) -> None:
    """``serve --workers 2`` with two ``reconcile --metrics-port`` processes, under eight
    clients debiting:

    * metrics: the service's /metrics counts every accepted debit once though two workers
      served them (both workers' counts are in its multiprocess files), and each
      reconciler's own listener shows its share of the flush: both flushed some, and
      together exactly the accepted debits;
    * graceful shutdown: SIGTERM to one reconciler mid-load: it exits 0 with nothing left
      pending under its consumer name; SIGTERM to the service mid-load: it exits 0, and
      every debit it answered 200 is in the ledger exactly once (the other reconciler
      flushes it), while no request it left unanswered (connection closed during the
      shutdown) was applied."""
    assert settings.redis_url and settings.db_dsn
    keys = stream_keys(settings)
    port = free_port()
    metrics_dir = tmp_path / "service-metrics"
    metrics_dir.mkdir()
    base = {**os.environ, "REDIS_URL": settings.redis_url, "DB_DSN": settings.db_dsn,
            "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards),
            "ENV": "test", "HOST": "127.0.0.1", "FLUSH_CLAIM_IDLE_MS": "1000"}
    base.pop("PROMETHEUS_MULTIPROC_DIR", None)
    base.pop("METRICS_PORT", None)
    service_env = {**base, "PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    service_log = tmp_path / "serve.log"
    service = spawn(["serve", "--workers", "2"], service_env, service_log)
    metrics_ports = [free_port(), free_port()]
    reconciler_logs = [tmp_path / f"reconcile-{i}.log" for i in range(2)]
    reconcilers = [spawn(["reconcile", "--metrics-port", str(p)], base, log)
                   for p, log in zip(metrics_ports, reconciler_logs, strict=True)]
    processes = [service, *reconcilers]
    users = [new_user() for _ in range(60)]  # free plan: 50 chat units a day each
    # A connection per request: the workers share one listening socket, and eight
    # keep-alive connections may all be accepted by the same worker.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20,
                                 headers={"X-Internal-Key": KEY, "Connection": "close"}
                                 ) as http, \
            httpx.AsyncClient(timeout=5) as scraper:
        first = load = Load(http, users, rng, micro_range=(10_000, 100_000))
        try:
            async def up() -> bool:
                for process, log in zip(processes, [service_log, *reconciler_logs],
                                        strict=True):
                    assert process.poll() is None, f"exited:\n{log_tail(log)}"
                with contextlib.suppress(httpx.TransportError):
                    ready = (await http.get("/ready")).status_code == 200
                    for p in metrics_ports:
                        await scrape(scraper, f"http://127.0.0.1:{p}/metrics")
                    return ready
                return False

            await eventually(up, 60, "service ready, both reconcilers' listeners up", 0.1)

            # 1. Metrics of every process, with the load paused and flushed.
            load.phase = "metrics"
            load.start(8)
            await eventually(lambda: _at_least(load, 400), 60, "400 debits accepted", 0.05)
            await load.finish()
            await wait_drained(raw_redis, keys, 60)
            accepted = load.count(200)
            page = await scrape(http, "/metrics")
            assert metric_value(page, "quota_debits_total", meter="chat", result="ok") \
                == accepted
            workers = {name: n for name, n in per_process_debits(metrics_dir).items() if n}
            assert len(workers) == 2 and sum(workers.values()) == accepted, workers

            async def flushed() -> list[float]:
                return [metric_value(await scrape(scraper, f"http://127.0.0.1:{p}/metrics"),
                                     "quota_flushed_events_total") for p in metrics_ports]

            async def all_flushed() -> bool:  # the counter moves after the XACK
                return sum(await flushed()) == accepted

            await eventually(all_flushed, 30, "both reconcilers' counts add up")
            shares = await flushed()
            assert all(share > 0 for share in shares), shares
            for p in metrics_ports:
                lag = await scrape(scraper, f"http://127.0.0.1:{p}/metrics")
                assert 'quota_flush_lag_entries{shard="0"}' in lag

            # 2. SIGTERM to a reconciler under load.
            first, load = load, Load(http, users, rng, micro_range=(10_000, 100_000))
            load.phase = "reconciler stop"
            load.start(8)
            await eventually(lambda: _at_least(load, 200), 60, "load running", 0.05)
            stopped = reconcilers[0]
            stopped.send_signal(signal.SIGTERM)
            code = await wait_exit(stopped, 30, "reconciler after SIGTERM")
            assert code == 0, log_tail(reconciler_logs[0])
            _, _, pending = await streams(raw_redis, keys)
            assert pending.get(f"{socket.gethostname()}-{stopped.pid}", 0) == 0, pending

            # 3. SIGTERM to the service under load.
            load.phase = "service stop"
            mark = len(load.attempts)
            await eventually(lambda: _at_least(load, 200, mark), 60, "load running", 0.05)
            service.send_signal(signal.SIGTERM)
            code = await wait_exit(service, 30, "service after SIGTERM")
            assert code == 0, log_tail(service_log)
            await load.finish()
            await wait_drained(raw_redis, keys, 60)  # by the reconciler left
        finally:
            await load.cancel()
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(20)
                stop_process(process)
    assert reconcilers[1].returncode == 0, log_tail(reconciler_logs[1])
    attempts = first.attempts + load.attempts if first is not load else load.attempts
    statuses = Counter(a.status for a in attempts)
    assert set(statuses) <= {0, 200, 403}, statuses
    summary = await assert_ledger_exact(settings.db_dsn, attempts)
    print(f"statuses across the stops {dict(statuses)}; {summary}; "
          f"flush shares before the stops {shares}")


async def _at_least(load: Load, n: int, since: int = 0) -> bool:
    return load.count(200, since) >= n


@pytest.mark.timeout(60)
async def test_metrics_page_reads_the_backlog_as_of_the_scrape(
    settings: Settings, raw_redis: aioredis.Redis, client: httpx.AsyncClient,
) -> None:
    """The backlog and flush-lag gauges the alert rules read are measured by each /metrics
    scrape (not left as the last /ready saw them): a debit with no reconciler running
    shows one more unflushed entry on the next scrape."""
    before = metric_value((await client.get("/metrics")).text, "quota_ledger_backlog_entries")
    body = {"user_id": new_user(), "action": "chat_tokens", "units": 1, "ref": "m-1"}
    response = await client.post("/internal/billing/quota/debit", json=body)
    assert response.status_code == 200, response.text
    page = (await client.get("/metrics")).text
    assert metric_value(page, "quota_ledger_backlog_entries") == before + 1
    assert metric_value(page, "quota_ledger_backlog_limit_entries") > 0


def per_process_requests(directory: Path, route: str) -> dict[str, float]:
    """Requests of ``route`` each process of a PROMETHEUS_MULTIPROC_DIR timed (file name ->
    its quota_http_request_duration_seconds count)."""
    counted = {}
    for path in sorted(directory.glob("histogram_*.db")):
        counted[path.name] = sum(
            s.value for family in MultiProcessCollector.merge([str(path)], accumulate=True)
            for s in family.samples
            if s.name == "quota_http_request_duration_seconds_count"
            and s.labels.get("route") == route)
    return counted


def listening_sockets(port: int) -> list[str]:
    """The IPv4 sockets listening on ``port`` (/proc/net/tcp lines in state 0A)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [line for line in lines
            if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"]


@pytest.mark.timeout(120)
async def test_connections_opened_at_once_are_spread_over_the_workers(
    settings: Settings, tmp_path: Path,
) -> None:
    """``serve --workers 2`` gives each worker a listening socket of its own on the port
    (SO_REUSEPORT: two LISTEN entries in /proc/net/tcp, where uvicorn's shared socket is
    one), and 64 keep-alive connections opened at once are answered by both workers (with
    one shared socket, whichever worker woke first took most of a burst: wrk's 64 once split
    60/4, ``ss -tnp``). SIGTERM then stops both workers and the service exits 0."""
    assert settings.redis_url and settings.db_dsn
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "REDIS_URL": settings.redis_url, "DB_DSN": settings.db_dsn,
           "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards),
           "ENV": "test", "HOST": "127.0.0.1", "PORT": str(port),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    env.pop("METRICS_PORT", None)
    log = tmp_path / "serve.log"
    service = spawn(["serve", "--workers", "2"], env, log)
    try:
        async def requests(n: int) -> list[bytes]:
            """``n`` connections opened at once, one GET /health on each: status lines."""
            opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                            for _ in range(n)))
            for _, writer in opened:
                writer.write(b"GET /health HTTP/1.1\r\nHost: qg\r\n\r\n")
            replies = [await reader.readuntil(b"\r\n\r\n") for reader, _ in opened]
            for _, writer in opened:
                writer.close()
            return [reply.split(b"\r\n", 1)[0] for reply in replies]

        async def both_up() -> bool:  # one connection at a time until both have answered
            with contextlib.suppress(OSError):
                await requests(1)
            return len([n for n in per_process_requests(metrics_dir, "health").values()
                        if n]) == 2

        await eventually(both_up, 60, "both workers answering", 0.05)
        assert len(listening_sockets(port)) == 2, listening_sockets(port)  # one each
        before = per_process_requests(metrics_dir, "health")
        assert set(await requests(64)) == {b"HTTP/1.1 200 OK"}
        after = per_process_requests(metrics_dir, "health")
        served = {name: n - before.get(name, 0) for name, n in after.items()}
        assert sum(served.values()) == 64 and all(n > 0 for n in served.values()), served
        service.send_signal(signal.SIGTERM)
        assert await wait_exit(service, 30, "service after SIGTERM") == 0, log_tail(log)
    finally:
        stop_process(service)
