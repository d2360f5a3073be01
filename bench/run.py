"""The benchmark of issue #20: the deployed shape and its baselines, in one run, one table.

    make bench                   # or: bench/run.sh [options]; --only deployed,pg ...

On this machine's Redis and PostgreSQL (a database and key prefix of its own, both removed
at the end), wrk -t1 at 64 connections, one row each (``--only`` names in brackets):

1. [deployed] ``quota-gateway serve --workers 2`` + ``quota-gateway reconcile`` (its own
   process), ``--users`` (10,000) users already loaded, a unique ref per debit; then a
   paced run at half its peak (``bench/debit.lua`` gives each connection an exponential
   think time, calibrated by short probes) for the p99 target;
2. [stopped] the same service with the reconciler stopped (restarted after, and its
   catch-up timed);
3. [noredis] the project's app around an engine that does no I/O (``bench/noredis_app.py``);
4. [starlette] a minimal Starlette endpoint (``bench/minimal_app.py``);
5. [pg] one PostgreSQL transaction per debit (``bench/pg_baseline.py``);
6. [prechecks] ``POST /internal/billing/check`` and ``GET /quota/check/{user}`` against
   the deployed shape (``bench/check.lua``);
7. [cold] cold loads: ``bench/cold_loads.py`` in a process of its own (private Redis,
   database of its own);
8. (with row 1) the reconciler keeping up: every 100 ms during row 1's peak run, the
   backlog of all shard streams and the age of the oldest unflushed entry
   (``ledger_lag.lua``, what the reconciler's lag gauges read).

For every run, the CPU time (utime + stime, and that of reaped children) of each process
group from /proc before and after: the service's workers (its session), the reconciler
(its session), Redis (``INFO server`` process_id), PostgreSQL (the postmaster and its
children, found from ``pg_backend_pid()``), wrk; divided by the operations. Writes
``bench/results/<date>-bench-<commit>.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
QG = str(Path(PY).with_name("quota-gateway"))
TOKEN = os.environ.get("SERVICE_TOKEN", "super-secret-dev")
DEBIT_PATH = "/internal/billing/quota/debit"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_PLAN = {
    "meters": {"chat": {"limit": 1_000_000_000, "period": "month"},
               "units": {"limit": 1_000_000_000, "period": "month"}},
    "duration_days": 30, "price": "0", "currency": "RUB",
}
#: The process groups whose CPU is counted "all in" (wrk and this driver are not).
ALL_IN = ("workers", "reconciler", "redis", "postgres")
ROWS = ("deployed", "stopped", "noredis", "starlette", "pg", "prechecks", "cold")
TARGETS = {
    "cpu_all_in_us": 150, "vs_pg": 5.0, "vs_starlette": 0.70, "half_peak_p99_ms": 5.0,
    "precheck_cpu_us": 100, "cold_users_per_s": 3000, "flush_lag_p99_s": 1.0,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- machine ------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info(redis_url: str, pg_dsn: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    client = redis.Redis.from_url(redis_url)
    rinfo = client.info("server")
    client.close()

    async def pg_version() -> str:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    import starlette
    import uvicorn

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvicorn": uvicorn.__version__,
        "starlette": starlette.__version__,
        "redis_server": rinfo.get("redis_version"),
        "postgres": asyncio.run(pg_version()),
        "wrk": (wrk.stdout + wrk.stderr).split("\n", 1)[0].strip(),
        "loadavg_at_start": loadavg(),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "git_modified_files": _git("status", "--porcelain", "--untracked-files=no").splitlines(),
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


# -- CPU accounting -------------------------------------------------------------------------
Table = dict[int, tuple[int, int, int]]


def proc_table() -> Table:
    """pid -> (parent pid, session id, CPU ticks: utime + stime + cutime + cstime), for
    every process. The reaped children's time counts, so a process that exits between
    two readings (a PostgreSQL backend, a worker) still shows in its parent's."""
    table: Table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            f = text.rsplit(")", 1)[1].split()
            table[int(entry)] = (int(f[1]), int(f[3]), sum(int(x) for x in f[11:15]))
    return table


def session_of(server: Server | None) -> Callable[[Table], int]:
    """The ticks of every process of a server's session (it and its workers)."""
    def ticks(table: Table) -> int:
        if server is None or server.proc is None:
            return 0
        sid = server.proc.pid
        return sum(t for _, s, t in table.values() if s == sid)
    return ticks


def tree_of(pid: int | None) -> Callable[[Table], int]:
    """The ticks of a process and its children (PostgreSQL: the postmaster, its backends
    and auxiliary processes; Redis: the server and any fork)."""
    def ticks(table: Table) -> int:
        if pid is None:
            return 0
        return sum(t for p, (pp, _, t) in table.items() if p == pid or pp == pid)
    return ticks


class backends_of:
    """The ticks of PostgreSQL's processes that work for database ``db``: its client
    backends and the server's own (WAL writer, checkpointer, background writer,
    autovacuum), not the backends of other databases (other tenants of a shared server).
    The pids are read from pg_stat_activity at each reading and the count is cumulative:
    what a process used since the last reading (all of it, for one that is new); a
    backend that exits between two readings loses what it used since the last one (the
    pools here keep theirs)."""

    def __init__(self, admin_dsn: str, db: str) -> None:
        self.admin_dsn, self.db = admin_dsn, db
        self.last: dict[int, int] | None = None
        self.total = 0

    async def _pids(self) -> list[int]:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE (datname = $1 OR backend_type <> "
                "'client backend') AND pid <> pg_backend_pid()", self.db)
            return [int(r["pid"]) for r in rows]
        finally:
            await conn.close()

    def __call__(self, table: Table) -> int:
        # utime + stime only: a backend's reaped children are not its own
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pids = asyncio.run(self._pids())
        else:  # called inside an event loop (bench/cold_loads.py): on a thread of its own
            with ThreadPoolExecutor(1) as pool:
                pids = pool.submit(lambda: asyncio.run(self._pids())).result()
        now = {pid: _own_ticks(pid) for pid in pids}
        if self.last is not None:
            self.total += sum(t - self.last.get(pid, 0) for pid, t in now.items())
        self.last = now
        return self.total


def _own_ticks(pid: int) -> int:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(f[11]) + int(f[12])


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of the whole machine (steal: taken by the hypervisor)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = values[3] + values[4], values[7]
    total = sum(values[:8])
    return total - idle - steal, steal, total


class Cpu:
    """Readings of named process groups' CPU, plus wrk (this process's reaped children),
    this driver and the whole machine."""

    def __init__(self, groups: dict[str, Callable[[Table], int]]) -> None:
        self.groups = groups

    def read(self) -> dict[str, float]:
        table = proc_table()
        out = {name: fn(table) / CLK_TCK for name, fn in self.groups.items()}
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        out["wrk"] = kids.ru_utime + kids.ru_stime
        out["driver"] = me.ru_utime + me.ru_stime
        busy, steal, total = machine_ticks()
        out["machine"], out["_steal"], out["_total"] = busy / CLK_TCK, steal / CLK_TCK, \
            total / CLK_TCK
        return out

    @staticmethod
    def per_op(before: dict[str, float], after: dict[str, float], ops: int) -> dict[str, Any]:
        us = {k: round((after[k] - before[k]) / max(ops, 1) * 1e6, 1)
              for k in before if not k.startswith("_")}
        us["all_in"] = round(sum(us.get(k, 0.0) for k in ALL_IN), 1)
        # the machine's busy time that none of the counted processes used: other tenants
        us["others"] = round(max(0.0, us["machine"] - sum(
            v for k, v in us.items() if k not in ("machine", "all_in", "postgres"))), 1)
        total = max(after["_total"] - before["_total"], 1e-9)
        return {"cpu_us_per_op": us,
                "machine_busy_pct": round(100 * (after["machine"] - before["machine"]) / total, 1),
                "steal_pct": round(100 * (after["_steal"] - before["_steal"]) / total, 1)}


# -- servers --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, port: int, path: str, body: dict[str, Any] | None = None,
         timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Content-Type": "application/json", "X-Internal-Key": TOKEN},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class Server:
    """One server process tree in its own session, stopped by its session's process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int,
                 logdir: Path) -> None:
        self.name, self.argv, self.env, self.port = name, argv, env, port
        self.logfile = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.logfile.read_text()[-3000:]}")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), 0.2):
                time.sleep(1.0)  # let every worker finish its start-up
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # uvicorn's workers leave with their parent; wait until the session is empty
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                s == self.proc.pid for _, s, _ in proc_table().values()):
            time.sleep(0.1)


# -- wrk ------------------------------------------------------------------------------------
class Wrk:
    """wrk -t1 runs with a WRKJSON summary (bench/debit.lua, bench/check.lua), the CPU of
    ``cpu``'s groups read around each."""

    def __init__(self, users: int) -> None:
        self.users = users
        self.runs = 0
        self.tag = f"r{int(time.time())}"

    def run(self, port: int, conns: int, seconds: float, cpu: Cpu | None = None,
            script: str = "debit.lua", mode: str | None = None,
            think_ms: float = 0) -> dict[str, Any]:
        self.runs += 1
        first = mode if mode is not None else f"{self.tag}x{self.runs}"  # debit.lua: the tag
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s",
                "--timeout", "5s", "-s", str(BENCH / script),
                f"http://127.0.0.1:{port}", "--", first, str(self.users)]
        if think_ms > 0:
            argv.append(f"{think_ms:.3f}")
        env = {**os.environ, "SERVICE_TOKEN": TOKEN, "WRK_PATH": DEBIT_PATH}
        before = cpu.read() if cpu else None
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        after = cpu.read() if cpu else None
        match = re.search(r"^WRKJSON (.*)$", done.stdout, re.M)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
        raw = json.loads(match[1])
        requests = raw["requests"]
        secs = raw["duration_us"] / 1e6
        lat = raw["latency_us"]
        out: dict[str, Any] = {
            "connections": conns, "think_ms": round(think_ms, 3), "seconds": round(secs, 2),
            "requests": requests, "rps": round(requests / secs, 1),
            "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000, "p999_ms": lat["p999"] / 1000,
            "max_ms": lat["max"] / 1000, "errors": raw["errors"],
            "non_2xx_or_socket_errors": sum(raw["errors"].values()),
        }
        if before is not None and after is not None:
            out.update(Cpu.per_op(before, after, requests))
        return out


def summarize(run: dict[str, Any]) -> str:
    text = (f"c={run['connections']:<3} {run['rps']:>8.0f}/s  p50 {run['p50_ms']:.2f} ms  "
            f"p99 {run['p99_ms']:.2f} ms  errors {run['non_2xx_or_socket_errors']}")
    if "cpu_us_per_op" in run:
        cpu = run["cpu_us_per_op"]
        text += ("  CPU µs/op " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items() if v)
                 + f"; machine {run['machine_busy_pct']}% busy")
    return text


def paced(port: int, wrk: Wrk, cpu: Cpu, target: float, args: argparse.Namespace,
          **script: Any) -> dict[str, Any]:
    """A run at ``target`` requests/s: ``--paced-connections`` connections, each waiting an
    exponential think time between requests, its mean calibrated by up to two short probes
    (a connection's cycle is its think time + latency + wrk's timer slack, ~1 ms)."""
    c = args.paced_connections
    cycle = c / target * 1000
    think = max(cycle - 1.0, 0.5)
    for _ in range(2):
        probe = wrk.run(port, c, args.calibrate, think_ms=think, **script)
        log(f"  calibration: think {think:.2f} ms -> {probe['rps']:.0f}/s")
        if abs(probe["rps"] / target - 1) < 0.03:
            break
        think = max(think + cycle - c / probe["rps"] * 1000, 0.1)
    run = wrk.run(port, c, args.paced_seconds, cpu, think_ms=think, **script)
    run["target_rps"] = round(target, 1)
    return run


# -- the reconciler's lag -------------------------------------------------------------------
class LagSampler:
    """Every ``interval`` s, ledger_lag.lua over every shard stream (by EVAL, so its cost is
    ``cmdstat_eval`` in INFO commandstats): the backlog (unflushed entries, all shards) and
    the age of the oldest unflushed entry (the flush lag)."""

    def __init__(self, redis_url: str, streams: list[str], interval: float = 0.1) -> None:
        from lua.source import SCRIPTS

        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.source = SCRIPTS["ledger_lag"].source
        self.streams = streams
        self.interval = interval
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self) -> tuple[int, float]:
        from lua.scripts import parse_ledger_lag

        lags = parse_ledger_lag(self.client.eval(self.source, len(self.streams), *self.streams))
        now_ms = time.time() * 1000
        oldest = [ms for n, ms in lags if n and ms]
        return sum(n for n, _ in lags), (now_ms - min(oldest)) / 1000 if oldest else 0.0

    def _loop(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            t = time.monotonic()
            backlog, age = self.once()
            self.samples.append((round(t - started, 3), backlog, round(age, 3)))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def eval_usec(self) -> int:
        return int(self.client.info("commandstats").get("cmdstat_eval", {}).get("usec", 0))

    def __enter__(self) -> LagSampler:
        self.samples = []
        self._usec0 = self.eval_usec()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._stop.clear()
        self.redis_usec = self.eval_usec() - self._usec0

    def wait_drained(self, timeout: float) -> tuple[float, int]:
        """Seconds until the backlog is empty (or ``timeout``), and the backlog at the start."""
        started = time.monotonic()
        first, _ = self.once()
        backlog = first
        while backlog and time.monotonic() - started < timeout:
            time.sleep(0.1)
            backlog, _ = self.once()
        return round(time.monotonic() - started, 2), first

    def summary(self, ops: int) -> dict[str, Any]:
        backlogs = [b for _, b, _ in self.samples]
        ages = sorted(a for _, _, a in self.samples)

        def pct(q: float) -> float:
            return ages[min(len(ages) - 1, int(q * len(ages)))] if ages else 0.0

        return {
            "samples": len(self.samples), "interval_s": self.interval,
            "backlog_max": max(backlogs, default=0), "backlog_mean": round(
                statistics.fmean(backlogs), 1) if backlogs else 0,
            "backlog_first": backlogs[0] if backlogs else 0,
            "backlog_last": backlogs[-1] if backlogs else 0,
            "flush_lag_p50_s": pct(0.50), "flush_lag_p99_s": pct(0.99),
            "flush_lag_max_s": ages[-1] if ages else 0.0,
            "sampler_redis_us_per_op": round(self.redis_usec / max(ops, 1), 2),
            "series": self.samples,
        }

    def close(self) -> None:
        self.client.close()


# -- setup and cleanup ------------------------------------------------------------------------
async def recreate_database(admin_dsn: str, name: str, drop_only: bool = False) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not drop_only:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def delete_prefix(redis_url: str, prefix: str) -> int:
    client = redis.Redis.from_url(redis_url)
    deleted, batch = 0, []
    for key in client.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(key)
        if len(batch) >= 2000:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    client.close()
    return deleted


def redis_pid(redis_url: str) -> int | None:
    """The pid of the Redis server when it runs on this machine (for its CPU time)."""
    client = redis.Redis.from_url(redis_url)
    pid = int(client.info("server")["process_id"])
    client.close()
    host = (redis.connection.parse_url(redis_url).get("host") or "127.0.0.1")
    return pid if host in ("127.0.0.1", "localhost") and Path(f"/proc/{pid}").exists() else None


def postmaster_pid(dsn: str) -> int | None:
    """The postmaster's pid (the parent of a backend), when PostgreSQL runs here."""
    async def parent_of_backend() -> int | None:
        conn = await asyncpg.connect(dsn)
        try:  # read while the backend lives
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
            stat = Path(f"/proc/{pid}/stat").read_text()
            return int(stat.rsplit(")", 1)[1].split()[1])
        except OSError:
            return None
        finally:
            await conn.close()

    return asyncio.run(parent_of_backend())


def prepare_users(port: int, dsn: str, users: int) -> dict[str, Any]:
    """The bench plan (through the API: PostgreSQL and every Redis shard's copy), assigned
    to ``users`` users in PostgreSQL in one statement, then each user loaded into Redis by
    its first ``GET /quota/check`` (32 at a time): "users already loaded"."""
    status, body = http("PUT", port, "/internal/billing/plans/bench", BENCH_PLAN)
    if status != 200:
        raise RuntimeError(f"PUT plan: {status} {body}")

    async def assign() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "INSERT INTO user_plans (user_id, plan_code, expires_at) "
                "SELECT 'bu' || g, 'bench', now() + interval '30 days' "
                "FROM generate_series(0, $1 - 1) AS g", users)
        finally:
            await conn.close()

    asyncio.run(assign())

    def load(i: int) -> None:
        st, answer = http("GET", port, f"/internal/billing/quota/check/bu{i}")
        if st != 200:
            raise RuntimeError(f"loading bu{i}: {st} {answer}")

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(load, range(users)))
    seconds = time.monotonic() - started
    return {"users": users, "seconds": round(seconds, 2),
            "users_per_s_over_http": round(users / seconds)}


# -- the rows -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dsn = f"{args.pg.rstrip('/')}/{args.db}"
        self.env = {
            **os.environ, "REDIS_URL": args.redis_url, "DB_DSN": self.dsn,
            "KEY_PREFIX": args.prefix, "SERVICE_TOKEN": TOKEN, "BENCH_PG_DSN": self.dsn,
            "PYTHONPATH": str(ROOT),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.logdir = BENCH / "logs"
        self.logdir.mkdir(exist_ok=True)
        self.wrk = Wrk(args.users)
        self.redis_pid = redis_pid(args.redis_url)
        self.admin_dsn = f"{args.pg.rstrip('/')}/postgres"
        self.pg_pid = postmaster_pid(self.admin_dsn)
        self.rows: dict[str, Any] = {}

    def cpu(self, workers: Server | None, reconciler: Server | None = None) -> Cpu:
        return Cpu({"workers": session_of(workers), "reconciler": session_of(reconciler),
                    "redis": tree_of(self.redis_pid),
                    "postgres": backends_of(self.admin_dsn, self.args.db),
                    "postgres_all_databases": tree_of(self.pg_pid)})

    def server(self, name: str, argv: list[str]) -> Server:
        port = free_port()
        return Server(name, [*argv, "--port", str(port)], self.env, port, self.logdir)

    def measured(self, name: str, port: int, cpu: Cpu, **script: Any) -> dict[str, Any]:
        """One measured run, after ``--background`` seconds with no request: what Redis,
        PostgreSQL and the rest of the machine were busy with then is other tenants' load
        (the shared servers' figures include it)."""
        background = self.background(cpu)
        run = self.wrk.run(port, self.args.connections, self.args.seconds, cpu, **script)
        run["background_cpu_ms_per_s"] = background
        log(f"{name}: {summarize(run)}; before it, idle: {background}")
        return run

    def background(self, cpu: Cpu) -> dict[str, float]:
        """CPU ms per second of Redis, PostgreSQL (ours, all databases) and the processes
        not counted, over ``--background`` s with no request; repeated, up to ``--settle`` s
        in all, while the other processes used more than ``--quiet`` ms/s (other tenants'
        tests: their load would take CPU from the row and raise the shared Redis's figure).
        The row then runs anyway; the last reading and the wait are recorded."""
        waited = 0.0
        while True:
            before, started = cpu.read(), time.monotonic()
            time.sleep(self.args.background)
            after, secs = cpu.read(), time.monotonic() - started
            ms = {k: (after[k] - before[k]) / secs * 1000 for k in after
                  if not k.startswith("_")}
            ms["others"] = ms["machine"] - sum(v for k, v in ms.items()
                                               if k not in ("machine", "postgres"))
            out = {k: round(max(ms[k], 0.0), 1)
                   for k in ("redis", "postgres", "postgres_all_databases", "others")}
            if out["others"] <= self.args.quiet or waited + secs > self.args.settle:
                out["waited_s"] = round(waited, 1)
                return out
            waited += secs

    # rows 1, 2, 6 and 8: the deployed shape
    def deployed(self, only: set[str]) -> None:
        args = self.args
        service = self.server("service", [QG, "serve", "--workers", "2"])
        metrics_port = free_port()  # the reconciler's listener: Server.start waits for it
        reconciler = Server("reconciler", [QG, "reconcile", "--metrics-port",
                                           str(metrics_port)], self.env, metrics_port,
                            self.logdir)
        from core.settings import load_settings
        from lua.keys import Keys

        settings = load_settings(self.env)
        streams = Keys(settings.key_prefix, settings.n_shards).all_ledgers()
        sampler = LagSampler(args.redis_url, streams)
        cpu = self.cpu(service, reconciler)
        try:
            service.start()
            reconciler.start()
            log(f"loading {args.users} users (plan in PostgreSQL, then a first check each)")
            self.rows["users_loaded"] = prepare_users(service.port, self.dsn, args.users)
            log(f"  {self.rows['users_loaded']}")
            port = service.port
            # What the processes spend with no request: the reconciler's polling, and
            # other tenants of the shared Redis and PostgreSQL (their tests, say): it is in
            # every figure below, more per operation the lower the rate.
            sampler.wait_drained(60)
            before, started = cpu.read(), time.monotonic()
            time.sleep(args.idle)
            after, secs = cpu.read(), time.monotonic() - started
            self.rows["idle_cpu_ms_per_s"] = {
                k: round((after[k] - before[k]) / secs * 1000, 1) for k in (*ALL_IN, "machine")}
            log(f"idle, CPU ms per second: {self.rows['idle_cpu_ms_per_s']}")
            if "deployed" in only:
                self.wrk.run(port, args.connections, args.warmup)
                drained, backlog = sampler.wait_drained(60)
                log(f"deployed: warm-up's {backlog} entries flushed in {drained} s")
                with sampler:
                    run = self.measured("1 deployed", port, cpu)
                run["flush"] = sampler.summary(run["requests"])
                run["flush"]["drained_after_s"], run["flush"]["backlog_after"] = \
                    sampler.wait_drained(60)
                f = run["flush"]
                log(f"8 flush: backlog max {f['backlog_max']} (first {f['backlog_first']}, "
                    f"last {f['backlog_last']}), lag p50 {f['flush_lag_p50_s']} s, "
                    f"p99 {f['flush_lag_p99_s']} s; empty {f['drained_after_s']} s after")
                background = self.background(cpu)
                half = paced(port, self.wrk, cpu, run["rps"] / 2, args)
                half["background_cpu_ms_per_s"] = background
                log(f"1 deployed at half peak: {summarize(half)}")
                run["half_peak"] = half
                self.rows["deployed"] = run
            if "prechecks" in only:
                sampler.wait_drained(60)
                for mode, key in (("billing", "precheck_billing"), ("quota", "precheck_quota")):
                    self.wrk.run(port, args.connections, 1, script="check.lua", mode=mode)
                    self.rows[key] = self.measured(f"6 {key}", port, cpu, script="check.lua",
                                                   mode=mode)
            if "stopped" in only:
                sampler.wait_drained(60)
                reconciler.stop()
                self.wrk.run(port, args.connections, 1)
                run = self.measured("2 reconciler stopped", port, cpu)
                started = time.monotonic()
                reconciler.start()
                seconds, backlog = sampler.wait_drained(120)
                run["catch_up"] = {"backlog": backlog,
                                   "seconds": round(time.monotonic() - started, 2),
                                   "entries_per_s": round(backlog / max(seconds, 1e-3))}
                log(f"2: the reconciler, restarted, flushed {backlog} entries in "
                    f"{run['catch_up']['seconds']} s")
                self.rows["stopped"] = run
        finally:
            sampler.close()
            reconciler.stop()
            service.stop()

    # rows 3, 4, 5: baselines, each alone on the machine
    def baseline(self, key: str, label: str, argv: list[str]) -> None:
        server = self.server(key, argv)
        try:
            server.start()
            status, body = http("POST", server.port, DEBIT_PATH, {
                "user_id": "bu0", "action": "chat_tokens", "units": 1,
                "ref": f"probe-{key}-{time.time_ns()}"})
            if status != 200:
                raise RuntimeError(f"{key}: probe debit answered {status} {body}")
            self.wrk.run(server.port, self.args.connections, self.args.warmup)
            self.rows[key] = self.measured(label, server.port, self.cpu(server))
        finally:
            server.stop()

    # row 7
    def cold(self) -> None:
        out = self.logdir / "cold_loads.json"
        background = self.background(self.cpu(None))
        log(f"7 cold loads: {self.args.cold_users} users, 20 debits each (bench/cold_loads.py)")
        done = subprocess.run([PY, "-m", "bench.cold_loads", "--users",
                               str(self.args.cold_users), "--pool", str(self.args.cold_pool),
                               "--out", str(out)], env=self.env, cwd=ROOT, check=False,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            raise RuntimeError(f"bench/cold_loads.py exited {done.returncode}: "
                               f"{done.stderr[-1500:]}")
        self.rows["cold"] = json.loads(out.read_text())
        self.rows["cold"]["background_cpu_ms_per_s"] = background
        c = self.rows["cold"]
        log(f"7 cold loads: {c['users_per_second']} users/s, CPU µs/user {c['cpu_us_per_user']}; "
            f"100k users {c['seconds_for_100k_users']} s")


# -- report -----------------------------------------------------------------------------------
def verdicts(rows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    v: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float, target: str, ok: bool) -> None:
        v[name] = {"value": value, "target": target, "pass": ok}

    d = rows.get("deployed")
    if d:
        cpu = d["cpu_us_per_op"]["all_in"]
        add("cpu_all_in_us", cpu, "<= 150 µs", cpu <= TARGETS["cpu_all_in_us"])
        if "pg" in rows:
            r = round(d["rps"] / rows["pg"]["rps"], 2)
            add("vs_pg", r, ">= 5 x row 5", r >= TARGETS["vs_pg"])
        if "starlette" in rows:
            r = round(d["rps"] / rows["starlette"]["rps"], 3)
            add("vs_starlette", r, ">= 70 % of row 4", r >= TARGETS["vs_starlette"])
        p99 = d["half_peak"]["p99_ms"]
        add("half_peak_p99_ms", p99, "< 5 ms", p99 < TARGETS["half_peak_p99_ms"])
        lag = d["flush"]["flush_lag_p99_s"]
        add("flush_lag_p99_s", lag, "< 1 s", lag < TARGETS["flush_lag_p99_s"])
    for key in ("precheck_billing", "precheck_quota"):
        if key in rows:
            cpu = rows[key]["cpu_us_per_op"]["all_in"]
            add(key, cpu, "<= 100 µs", cpu <= TARGETS["precheck_cpu_us"])
    if "cold" in rows:
        ups = rows["cold"]["users_per_second"]
        add("cold_users_per_s", ups, ">= 3,000/s", ups >= TARGETS["cold_users_per_s"])
    return v


def markdown(rows: dict[str, Any], v: dict[str, dict[str, Any]], conns: int) -> str:
    mark = {True: "pass", False: "**FAIL**"}

    def verdict(*names: str) -> str:
        return ", ".join(f"{mark[v[n]['pass']]}" for n in names if n in v)

    def cpu_cells(run: dict[str, Any]) -> str:
        c = run["cpu_us_per_op"]
        parts = " + ".join(f"{c[k]:.0f}" if c[k] else "0" for k in ALL_IN)
        return f"**{c['all_in']:.0f}** = {parts}"

    def row(n: str, what: str, run: dict[str, Any], target: str, result: str) -> str:
        bg = run.get("background_cpu_ms_per_s")
        bg_txt = (f"{bg['redis']:.0f} / {bg['postgres_all_databases'] - bg['postgres']:.0f} / "
                  f"{bg['others']:.0f}") if bg else "-"
        if bg and bg.get("waited_s"):
            bg_txt += f" (after {bg['waited_s']:.0f} s waiting)"
        bg_txt += f"; during: {run['cpu_us_per_op']['others']:.0f}"
        return (f"| {n} | {what} | {cpu_cells(run)} | {run['rps']:,.0f} | "
                f"{run['p50_ms']:.2f} / {run['p99_ms']:.2f} | {bg_txt} | {target} | {result} |")

    lines = [
        f"| # | what (wrk -t1 -c{conns}) | CPU µs per op, all in = workers + reconciler + "
        "Redis + PostgreSQL | ops/s | p50 / p99 ms | other load: just before, CPU ms/s of "
        "Redis / PostgreSQL's other databases / other processes; during, other processes' "
        "µs per op | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    d = rows.get("deployed")
    if d:
        h = d["half_peak"]
        t = [f"≤ 150 µs: **{v['cpu_all_in_us']['value']:.0f}**"]
        if "vs_pg" in v:
            t.append(f"≥ 5 x row 5: **{v['vs_pg']['value']:.2f} x**")
        if "vs_starlette" in v:
            t.append(f"≥ 70 % of row 4: **{v['vs_starlette']['value'] * 100:.0f} %**")
        t.append(f"p99 at half peak ({h['rps']:,.0f}/s) < 5 ms: **{h['p99_ms']:.2f} ms**")
        lines.append(row("1", "deployed: `serve --workers 2` + `reconcile`, debits", d,
                         "; ".join(t), verdict("cpu_all_in_us", "vs_pg", "vs_starlette",
                                               "half_peak_p99_ms")))
    if "stopped" in rows:
        s = rows["stopped"]
        lines.append(row("2", "the same, reconciler stopped (catch-up after: "
                         f"{s['catch_up']['backlog']:,} entries in "
                         f"{s['catch_up']['seconds']:.1f} s)", s, "", ""))
    for n, key, what in (("3", "noredis", "the app, no I/O (`bench/noredis_app.py`)"),
                         ("4", "starlette", "minimal Starlette endpoint "
                                            "(`bench/minimal_app.py`)"),
                         ("5", "pg", "one PostgreSQL transaction per debit "
                                     "(`bench/pg_baseline.py`)")):
        if key in rows:
            lines.append(row(n, what, rows[key], "", ""))
    for key, what in (("precheck_billing", "pre-check `POST /internal/billing/check`"),
                      ("precheck_quota", "pre-check `GET /quota/check/{user}`")):
        if key in rows:
            lines.append(row("6", what + ", deployed shape", rows[key],
                             f"≤ 100 µs: **{v[key]['value']:.0f}**", verdict(key)))
    if "cold" in rows:
        c = rows["cold"]
        cu = c["cpu_us_per_user"]
        lines.append(
            f"| 7 | cold loads: {c['concurrency']} concurrent first checks of users not in "
            f"Redis (plan, credits, {c['debits_each']} debits each; {c['users']:,} users) | "
            f"**{cu['all_in']:.0f}** = {cu['loader']:.0f} (loader) + 0 + {cu['redis']:.0f} + "
            f"{cu['postgres']:.0f} | {c['users_per_second']:,} users/s | - | - | "
            f"≥ 3,000 users/s; "
            f"100,000 users back in **{c['seconds_for_100k_users']:.0f} s** (from "
            f"{c['users']:,}) | {verdict('cold_users_per_s')} |")
    if d:
        f = d["flush"]
        lines.append(
            f"| 8 | the reconciler at row 1's peak ({f['samples']} samples, 100 ms apart) | "
            f"- | backlog max {f['backlog_max']:,}, last {f['backlog_last']:,} | lag "
            f"{f['flush_lag_p50_s']:.2f} / {f['flush_lag_p99_s']:.2f} s | - | flush lag p99 "
            f"< 1 s: **{f['flush_lag_p99_s']:.2f} s** | {verdict('flush_lag_p99_s')} |")
    idle = rows.get("idle_cpu_ms_per_s")
    if idle:
        lines += ["", "Idle, the service and reconciler up, no request (CPU ms per second): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in idle.items()) + "."]
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the quota gateway benchmark (issue #20).")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432",
                   help="PostgreSQL server (DSN without a database)")
    p.add_argument("--db", default="qg_bench", help="database to (re)create, dropped after")
    p.add_argument("--prefix", default="qgbench", help="Redis key prefix, deleted after")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--idle", type=float, default=3, help="seconds of the idle reading")
    p.add_argument("--background", type=float, default=1,
                   help="seconds with no request before each measured run (other load)")
    p.add_argument("--quiet", type=float, default=200,
                   help="CPU ms/s of other processes under which a row starts at once")
    p.add_argument("--settle", type=float, default=20,
                   help="seconds a row waits at most for the machine to be that quiet")
    p.add_argument("--paced-seconds", type=float, default=10)
    p.add_argument("--paced-connections", type=int, default=32)
    p.add_argument("--calibrate", type=float, default=3, help="seconds per calibration probe")
    p.add_argument("--cold-users", type=int, default=10_000,
                   help="users of the cold-load row (100,000 is measured if given)")
    p.add_argument("--cold-pool", type=int, default=20,
                   help="the cold loader's PostgreSQL connections (the deployed shape's: 2 "
                        "workers x DB_POOL_MAX 10)")
    p.add_argument("--only", default="", help=f"comma list of rows: {', '.join(ROWS)}")
    p.add_argument("--out", default="", help="result file (default bench/results/"
                   "<date>-bench-<commit>.json; bench/logs/bench-partial.json with --only)")
    p.add_argument("--keep", action="store_true", help="keep the database and Redis keys")
    return p.parse_args()


def _leave(signum: int, frame: object) -> None:
    """SIGTERM or SIGINT: leave through the ``finally`` blocks, which stop the servers,
    delete the Redis keys and drop the database."""
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _leave)
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    only = set(filter(None, args.only.split(","))) or set(ROWS)
    if only - set(ROWS):
        sys.exit(f"--only: unknown {sorted(only - set(ROWS))}; rows: {', '.join(ROWS)}")
    started = time.monotonic()
    result: dict[str, Any] = {"machine": machine_info(args.redis_url, f"{args.pg}/postgres")}
    result["settings"] = vars(args)
    log(f"machine: {result['machine']}")
    bench = Bench(args)
    log(f"recreating database {args.db}; deleting Redis keys {args.prefix}:*")
    asyncio.run(recreate_database(f"{args.pg}/postgres", args.db))
    delete_prefix(args.redis_url, args.prefix)
    failed: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], None]) -> None:
        """A row that fails (a server that would not start, PostgreSQL out of connections
        for other tenants) is logged and recorded; the others still run."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            failed[name] = repr(exc)[:2000]
            log(f"{name}: FAILED {exc!r}"[:2000])

    try:
        subprocess.run([QG, "migrate"], env=bench.env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        if only & {"deployed", "stopped", "prechecks"}:
            attempt("deployed", lambda: bench.deployed(only))
        if "noredis" in only:
            attempt("noredis", lambda: bench.baseline(
                "noredis", "3 no-I/O app", [PY, "-m", "bench.noredis_app", "--workers", "2"]))
        if "starlette" in only:
            attempt("starlette", lambda: bench.baseline(
                "starlette", "4 minimal Starlette",
                [PY, "-m", "bench.minimal_app", "--workers", "2"]))
        if "pg" in only:
            def pg() -> None:
                subprocess.run([PY, "-m", "bench.pg_baseline", "setup", "--users",
                                str(args.users)], env=bench.env, cwd=ROOT, check=True)
                bench.baseline("pg", "5 PostgreSQL per debit",
                               [PY, "-m", "bench.pg_baseline", "serve", "--workers", "2"])
            attempt("pg", pg)
        if "cold" in only:
            attempt("cold", bench.cold)
    finally:
        if not args.keep:
            log(f"deleted {delete_prefix(args.redis_url, args.prefix)} keys {args.prefix}:*; "
                f"dropping database {args.db}")
            asyncio.run(recreate_database(f"{args.pg}/postgres", args.db, drop_only=True))
    if failed:
        result["failed"] = failed
    rows = bench.rows
    result["rows"] = rows
    result["verdicts"] = verdicts(rows)
    result["machine"]["loadavg_at_end"] = loadavg()
    result["elapsed_seconds"] = round(time.monotonic() - started, 1)
    result["markdown"] = markdown(rows, result["verdicts"], args.connections) + "".join(
        f"\n\n**{name} failed:** `{error[:300]}`" for name, error in failed.items())
    partial = only != set(ROWS)
    out = Path(args.out) if args.out else (
        BENCH / "logs" / "bench-partial.json" if partial else BENCH / "results" /
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d}-bench-{result['machine']['git_head']}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"results in {out} ({result['elapsed_seconds']} s); load average at start "
        f"{result['machine']['loadavg_at_start']}, at end {result['machine']['loadavg_at_end']}")
    print()
    print(result["markdown"])
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
