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
        assert process.poll() is None, "the service exited during start-up"
        try:
            last = httpx.get(f"{url}/ready", timeout=2)
            if last.status_code == 200:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready in {seconds}s: {last and last.text}")


def test_serve_without_urls_starts_embedded_servers_and_flushes(tmp_path: Path) -> None:
    """No REDIS_URL/DB_DSN: serve migrates, serves, debits, and the reconciler flushes."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DB_DSN")}
    env.update(DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    process = subprocess.Popen(
        [sys.executable, "-m", "hotpath.cli", "serve", "--migrate", "--with-reconciler"],
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
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/openapi.json").json()["openapi"].startswith("3.")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert "embedded Redis" in text and "embedded PostgreSQL" in text, text
