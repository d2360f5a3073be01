"""The fresh-machine path: `quota-gateway serve` with no URLs starts embedded servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ops.devservers import free_port
from tests.support import KEY, metric_value, new_ref, new_user

pytestmark = pytest.mark.smoke


def _wait_ready(url: str, process: subprocess.Popen[bytes], seconds: float) -> httpx.Response:
    deadline = time.monotonic() + seconds
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise AssertionError(f"the service exited during start-up:\n{said[-4000:]}")
        try:
            last = httpx.get(f"{url}/ready", timeout=2)
            if last.status_code == 200:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready in {seconds}s: {last and last.text}")


def _raw_exchange(port: int, request: bytes) -> tuple[int, str, object]:
    """Send bytes no HTTP client would send; the status, the lower-cased head, the JSON body."""
    with socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):  # the server closes the connection after it
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode().lower(), json.loads(body)


def _debit_counter_pids(metrics_dir: Path) -> set[str]:
    """The processes that have counted debits (prometheus' per-pid counter files: the
    reconciler and the parent have files too, without debits)."""
    return {f.stem.rsplit("_", 1)[1] for f in metrics_dir.glob("counter_*.db")
            if b"quota_debits_total" in f.read_bytes()}


def test_serve_without_urls_starts_embedded_servers_and_flushes(tmp_path: Path) -> None:
    """No REDIS_URL/DB_DSN: serve migrates, serves with 2 workers (both counting: the
    metrics add up across them), flushes, and stops its embedded servers on exit."""
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DB_DSN", "PORT")}
    env.update(DATA_DIR=str(tmp_path / "data"), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--migrate", "--with-reconciler",
         "--workers", "2", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_ready(url, process, 120)
        assert ready.json()["checks"] == {"redis": "ok", "postgres": "ok", "ledger": "ok"}
        status, headers_out, error = _raw_exchange(
            port, b"POST /internal/billing/quota/debit HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: ten\r\n\r\n{}")
        assert status == 400 and "content-type: application/json" in headers_out, headers_out
        assert error == {"error": {"code": "bad_request", "field": None,
                                   "message": "Invalid HTTP request received."}}
        user = new_user()
        headers = {"X-Internal-Key": KEY}
        ok = {"meter": "chat", "result": "ok"}
        counted = metric_value(httpx.get(f"{url}/metrics").text, "quota_debits_total", **ok)
        body = {"user_id": user, "action": "chat_tokens", "units": 2, "ref": new_ref()}
        debit = httpx.post(f"{url}/internal/billing/quota/debit", json=body, headers=headers)
        assert debit.status_code == 200, debit.text
        assert debit.json()["remaining"] == 48
        check = httpx.get(f"{url}/internal/billing/quota/check/{user}", headers=headers)
        assert check.json()["remain_chat"] == 48

        def one_more() -> int:  # a hundredth of a unit: the free plan allows 50 a day
            more = dict(body, ref=new_ref(), units=0.01)
            with httpx.Client() as fresh:  # a new connection each time
                return fresh.post(f"{url}/internal/billing/quota/debit", json=more,
                                  headers=headers).status_code

        # More on parallel connections until both workers have counted some (the kernel
        # hands a burst of connections to whichever worker wakes first).
        debits = 1
        with ThreadPoolExecutor(8) as pool:
            while len(_debit_counter_pids(metrics_dir)) < 2 and debits < 200:
                assert list(pool.map(lambda _: one_more(), range(8))) == [200] * 8
                debits += 8
        assert len(_debit_counter_pids(metrics_dir)) == 2, "one worker served every debit"
        metrics = httpx.get(f"{url}/metrics").text  # both workers' counts, added up
        assert metric_value(metrics, "quota_debits_total", **ok) == counted + debits
        deadline = time.monotonic() + 30  # the reconciler child flushes them to PostgreSQL
        flushed: list[object] = []
        while time.monotonic() < deadline and len(flushed) < debits:
            page = httpx.get(f"{url}/internal/billing/transactions",
                             params={"user_id": user, "limit": "500"}, headers=headers)
            flushed = page.json()["transactions"]
            time.sleep(0.2)
        assert len(flushed) == debits
        assert httpx.get(f"{url}/openapi.json").json()["openapi"].startswith("3.")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert "embedded Redis" in text and "embedded PostgreSQL" in text, text
    redis_port = int(re.search(r"embedded Redis: redis://127\.0\.0\.1:(\d+)", text)[1])
    with pytest.raises(OSError):  # stopped on exit: nothing listens any more
        socket.create_connection(("127.0.0.1", redis_port), 1).close()
    assert not (tmp_path / "data" / "postgres" / "pgdata" / "postmaster.pid").exists()
