"""Child processes that never outlive their parent, and one kept running.

``make run`` starts the service, its reconciler and, on a bare machine, an embedded Redis
and PostgreSQL. Killed with SIGKILL (or crashing), the parent cannot stop them itself, so
every child asks the kernel to signal it when its parent dies (Linux ``PR_SET_PDEATHSIG``),
and the next ``make run`` finds nothing left behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("quota_gateway.lifecycle")

_PR_SET_PDEATHSIG = 1
#: How long a child restarted by ``Supervised`` waits first, and at most, seconds.
RESTART_MIN_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
#: A child that ran this long before it exited starts its next wait from the minimum.
STABLE_SECONDS = 60.0


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the process
    starting it dies (a no-op off Linux). It runs in the child after any change of user
    (which would clear the setting), and exits at once if the parent is already gone."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # died between fork and prctl
            os._exit(1)

    return preexec


def follow_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """The same, for a process that was started without it (a uvicorn worker). A parent
    that died before this call (while the worker was starting) sent no signal: with
    ``parent_pid``, the worker sends it to itself."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def stop_processes(processes: Sequence[subprocess.Popen[bytes] | None], timeout: float,
                   sig: int = signal.SIGTERM) -> None:
    """Stop processes at once: ``sig`` to each one still running, then each is waited for,
    and SIGKILLed if it is still running ``timeout`` seconds after the signals."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.send_signal(sig)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Supervised:
    """A child process kept running: restarted after it exits, with a growing wait (1 s to
    30 s; from 1 s again after a run of a minute), each exit logged, until ``stop``."""

    def __init__(self, argv: Sequence[str], name: str, *,
                 min_seconds: float = RESTART_MIN_SECONDS,
                 max_seconds: float = RESTART_MAX_SECONDS) -> None:
        self.argv = list(argv)
        self.name = name
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"supervise-{name}", daemon=True)

    def start(self) -> None:
        """Start the child and its watcher thread."""
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.process = subprocess.Popen(self.argv, preexec_fn=die_with_parent())
            self.starts += 1
        log.info("%s started (pid %d)", self.name, self.process.pid)

    def _run(self) -> None:
        wait = self.min_seconds
        while not self._stopping.is_set():
            process = self.process
            assert process is not None
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                wait = self.min_seconds
            log.error("%s (pid %d) exited with status %s; restarting in %.0f s",
                      self.name, process.pid, code, wait)
            if self._stopping.wait(wait):
                return
            wait = min(self.max_seconds, wait * 2)
            self._spawn()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop restarting, then terminate the child (SIGKILL after ``timeout``)."""
        stop_all([self], timeout)

    def _stop_restarting(self) -> subprocess.Popen[bytes] | None:
        """No restart from now on; the child (None: never started)."""
        with self._lock:
            self._stopping.set()
            return self.process


def stop_all(children: Sequence[Supervised], timeout: float = 15.0) -> None:
    """Stop several ``Supervised`` children at once: no more restarts, then
    ``stop_processes`` (SIGTERM to each, SIGKILL after ``timeout``)."""
    stop_processes([child._stop_restarting() for child in children], timeout)
