"""The fresh-machine path: `quota-gateway serve` with no URLs starts embedded servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hotpath.devservers import free_port
from tests.support import KEY, new_ref, new_user

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


def test_serve_without_urls_starts_embedded_servers_and_flushes(tmp_path: Path) -> None:
    """No REDIS_URL/DB_DSN: serve migrates, serves with 2 workers, counts, and flushes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DB_DSN")}
    env.update(DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    process = subprocess.Popen(
        [sys.executable, "-m", "hotpath.cli", "serve", "--migrate", "--with-reconciler",
         "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_ready(url, process, 120)
        assert ready.json()["checks"] == {"redis": "ok", "postgres": "ok"}
        user = new_user()
        headers = {"X-Internal-Key": KEY}
        body = {"user_id": user, "action": "chat_tokens", "units": 2, "ref": new_ref()}
        debit = httpx.post(f"{url}/internal/billing/quota/debit", json=body, headers=headers)
        assert debit.status_code == 200, debit.text
        assert debit.json()["remaining"] == 48
        check = httpx.get(f"{url}/internal/billing/quota/check/{user}", headers=headers)
        assert check.json()["remain_chat"] == 48
        for _ in range(9):  # spread over both workers by the kernel; metrics must add up
            more = dict(body, ref=new_ref(), units=1)
            with httpx.Client() as fresh:  # a new connection each time
                assert fresh.post(f"{url}/internal/billing/quota/debit", json=more,
                                  headers=headers).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'quota_debits_total{meter="chat",result="ok"} 10.0' in metrics
        deadline = time.monotonic() + 30  # the reconciler child flushes them to PostgreSQL
        flushed: list[object] = []
        while time.monotonic() < deadline and len(flushed) < 10:
            page = httpx.get(f"{url}/internal/billing/transactions",
                             params={"user_id": user, "limit": "50"}, headers=headers)
            flushed = page.json()["transactions"]
            time.sleep(0.2)
        assert len(flushed) == 10
        assert httpx.get(f"{url}/openapi.json").json()["openapi"].startswith("3.")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert "embedded Redis" in text and "embedded PostgreSQL" in text, text
