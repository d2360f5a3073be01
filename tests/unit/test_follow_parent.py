"""A worker whose parent died while it was starting (before it asked to follow it) still
goes: follow_parent with the parent's pid sends itself the signal (ops/lifecycle.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

WORKER = textwrap.dedent("""
    import os, sys, time
    from ops.lifecycle import follow_parent

    def main(parent_pid):
        time.sleep(1.0)  # still starting when the parent is killed
        follow_parent(15, parent_pid)
        time.sleep(60)
""")
PARENT = textwrap.dedent("""
    import multiprocessing, os, sys
    sys.path.insert(0, sys.argv[1])
    import follow_worker

    if __name__ == "__main__":
        multiprocessing.set_start_method("spawn")
        child = multiprocessing.Process(target=follow_worker.main, args=(os.getpid(),))
        child.start()
        print(child.pid, flush=True)
        import time
        time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_whose_parent_died_while_it_started_goes_too(tmp_path: Path) -> None:
    (tmp_path / "follow_worker.py").write_text(WORKER)
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)],
                              stdout=subprocess.PIPE, cwd=root,
                              env={**os.environ, "PYTHONPATH": f"{root}:{tmp_path}"})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    time.sleep(0.2)  # the worker is running, not yet following its parent
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the worker outlived its parent"
