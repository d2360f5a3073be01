"""Metrics across processes: the figures /metrics adds up from several processes' files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core import metrics

SET_LAG = """
from core import metrics
metrics.FLUSH_LAG_SECONDS.labels("7").set({lag})
metrics.LEDGER_OLDEST_SECONDS.set({lag})
metrics.FLUSHED_EVENTS.inc({flushed})
"""


def sample(page: str, name: str) -> float:
    """The value of one unlabelled (or fully spelled) sample of an exposition page."""
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the page")


def test_a_gauge_reads_as_last_set_not_as_a_dead_process_left_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (serve --workers N, serve --with-reconciler), a process
    that set a gauge and died (a reconciler crashed with a lag of 30 s, then restarted)
    does not keep its value on /metrics: the gauge reads as the live process last set it
    (0), so a flush-lag alert clears; counters of both processes are added up."""
    root = Path(__file__).parents[2]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(root)}
    for lag, flushed in ((30, 5), (0, 7)):  # the crashed process first, then its successor
        subprocess.run([sys.executable, "-c", SET_LAG.format(lag=lag, flushed=flushed)],
                       env=env, check=True, cwd=root)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    page = metrics.render()[0].decode()
    assert sample(page, 'quota_flush_lag_seconds{shard="7"}') == 0
    assert sample(page, "quota_ledger_oldest_seconds") == 0
    assert sample(page, "quota_flushed_events_total") == 12
