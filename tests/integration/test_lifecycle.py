"""`make run` never leaves the next `make run` broken (issue #17, defect 7), and the
reconciler of `serve --with-reconciler` is kept running (defect 9).

`serve` killed with SIGKILL takes its reconciler, its workers and its embedded Redis and
PostgreSQL with it (each child asked the kernel to signal it when its parent dies); a
server an earlier run left on the data directory is stopped, with a message, before a new
one starts; a reconciler child that dies is restarted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from ops.devservers import EmbeddedPostgres, free_port
from ops.devservers import process_alive as alive
from tests.integration.test_smoke import _wait_ready
from tests.support import KEY, new_ref, new_user

pytestmark = pytest.mark.smoke


def wait_gone(pids: dict[str, int], seconds: float) -> list[str]:
    """The names of ``pids`` still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids.values()):
        time.sleep(0.1)
    return [name for name, pid in pids.items() if alive(pid)]


def serve(data: Path, port: int, *extra: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """`quota-gateway serve --migrate --with-reconciler` with embedded servers in ``data``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("REDIS_URL", "DB_DSN", "PORT", "PROMETHEUS_MULTIPROC_DIR")}
    base.update(DATA_DIR=str(data), **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--migrate", "--with-reconciler",
         "--port", str(port), *extra],
        env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    """The direct children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_killed_serve_takes_its_children_and_the_next_one_starts(tmp_path: Path) -> None:
    """SIGKILL to serve (2 workers, reconciler, embedded Redis and PostgreSQL): within 30 s
    none of them runs; a second serve on the same data directory becomes ready (no "lock
    file postmaster.pid already exists") and keeps the data."""
    data, port = tmp_path / "data", free_port()
    first = serve(data, port, "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    user = new_user()
    headers = {"X-Internal-Key": KEY}
    try:
        _wait_ready(url, first, 120)
        debit = httpx.post(f"{url}/internal/billing/quota/debit", headers=headers, json={
            "user_id": user, "action": "chat_tokens", "units": 2, "ref": new_ref()})
        assert debit.status_code == 200, debit.text
        pids = {"redis": int((data / "redis" / "redis.pid").read_text()),
                "postgres": int((data / "postgres" / "pgdata" / "postmaster.pid")
                                .read_text().split()[0])}
        for child in children(first.pid):
            if child not in pids.values():
                pids[f"child {child}"] = child  # the reconciler and the uvicorn workers
        assert len(pids) >= 5, pids  # redis, postgres, reconciler, two workers
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert wait_gone(pids, 30) == []
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=10)

    second = serve(data, port)
    try:
        try:
            _wait_ready(url, second, 120)
        except AssertionError:
            second.kill()
            said = second.communicate(timeout=10)[0].decode(errors="replace")
            raise AssertionError(f"the second serve did not start:\n{said[-4000:]}") from None
        check = httpx.get(f"{url}/internal/billing/quota/check/{user}", headers=headers)
        assert check.json()["remain_chat"] == 48  # the data survived
    finally:
        second.terminate()
        output, _ = second.communicate(timeout=60)
    assert "already exists" not in output.decode(errors="replace")


def test_a_server_left_by_an_earlier_run_is_stopped_with_a_message(tmp_path: Path) -> None:
    """A PostgreSQL still running on the data directory (an earlier run of a version whose
    servers outlived it) is stopped, saying so, and serve starts its own."""
    data, port = tmp_path / "data", free_port()
    left = EmbeddedPostgres(data / "postgres")
    left.start()
    stale_pid = int((data / "postgres" / "pgdata" / "postmaster.pid").read_text().split()[0])
    process = serve(data, port)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", process, 120)
        assert left.process is not None
        left.process.wait(30)  # stopped by serve; reaped here, its parent
        left.process = None
        assert not alive(stale_pid)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
        left.stop()
    text = output.decode(errors="replace")
    assert f"found a PostgreSQL left running by an earlier run (pid {stale_pid}" in text, text


def test_a_dead_reconciler_child_is_restarted(tmp_path: Path, settings: Settings) -> None:
    """SIGKILL to the reconciler child: serve logs it and starts another, which flushes
    the debits made meanwhile."""
    port = free_port()
    env = {"REDIS_URL": settings.redis_url or "", "DB_DSN": settings.db_dsn or "",
           "KEY_PREFIX": settings.key_prefix, "N_SHARDS": str(settings.n_shards)}
    process = serve(tmp_path / "data", port, env=env)
    url, headers, user = f"http://127.0.0.1:{port}", {"X-Internal-Key": KEY}, new_user()
    try:
        _wait_ready(url, process, 120)
        [reconciler] = children(process.pid)
        os.kill(reconciler, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [
                c for c in children(process.pid) if c != reconciler and alive(c)]:
            time.sleep(0.1)
        [restarted] = [c for c in children(process.pid) if c != reconciler and alive(c)]
        debit = httpx.post(f"{url}/internal/billing/quota/debit", headers=headers, json={
            "user_id": user, "action": "chat_tokens", "units": 1, "ref": new_ref()})
        assert debit.status_code == 200, debit.text
        deadline, flushed = time.monotonic() + 30, []
        while time.monotonic() < deadline and not flushed:
            flushed = httpx.get(f"{url}/internal/billing/transactions", headers=headers,
                                params={"user_id": user}).json()["transactions"]
            time.sleep(0.2)
        assert len(flushed) == 1
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert re.search(rf"reconciler \(pid {reconciler}\) exited with status -9; restarting",
                     text), text
    assert restarted != reconciler
