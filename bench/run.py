"""One benchmark run: the quota service over HTTP next to its baselines, on this machine.

    bench/run.sh                 # or: .venv/bin/python -m bench.run [options]

In one run (about eleven minutes):

1. (re)creates the PostgreSQL database ``qg_bench``, migrates it, and deletes every Redis
   key under the prefix ``qgbench`` (nothing else on either server is touched);
2. starts, one at a time, each server on a free port, warms it up, and loads it with
   ``wrk -t1`` over keep-alive connections at a few connection counts (the best one is the
   peak), then at half the peak rate (paced: ``bench/debit.lua`` gives every connection
   an exponential think time, calibrated by one or two short probes):

   * ``debit_1w`` / ``debit_2w``: ``quota-gateway serve`` with 1 and 2 workers;
   * ``noredis_2w``: the real app with an engine that does no I/O (``bench/noredis_app.py``);
   * ``pg_2w``: one PostgreSQL transaction per debit (``bench/pg_baseline.py``);

   every request is ``POST /internal/billing/quota/debit`` with the same JSON body shape,
   a unique ref, users spread over ``--users`` ids; then come the two diagnostic variants
   of the no-Redis server (``--diagnose``) and a second pass over ``debit_2w``,
   ``noredis_2w`` and ``pg_2w`` at their best connection count (the machine is a VM whose
   speed drifts: the peak is the best run of both passes, the half-peak figure the paced
   run with the lower p99 of those that reached half the final peak; every run is kept in
   the JSON);
3. measures (a) once more with ``debit_2w`` and ``noredis_2w`` up at once, wrk loading
   them in turn (``--pairs`` rounds; in each, both servers at every count of
   ``--pair-conns``, and each server's best run of the round is its figure); (a) is the
   median round's ratio, which the VM's drift cannot move the way it moves two peaks
   measured minutes apart;
4. runs ``redis-benchmark`` on EVALSHA of the service's debit script with the same keys and
   arguments (refs random by ``__rand_int__``, so no answer comes from the idempotency fast
   path), unpipelined and with 16 commands per pipeline;
5. measures Redis memory per user and per idempotency key on a private redis-server
   (``bench/memory.py``);
6. deletes its Redis keys, writes ``bench/results.json`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as dt
import io
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
import time
import urllib.request
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
#: The two servers target (a) compares: at their peak, two workers can keep both cores busy.
RATIO_PAIR = ("debit_2w", "noredis_2w")
BENCH_PLAN = {
    "meters": {"chat": {"limit": 1_000_000_000, "period": "month"},
               "units": {"limit": 1_000_000_000, "period": "month"}},
    "duration_days": 30, "price": "0", "currency": "RUB",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- machine ------------------------------------------------------------------------------
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
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "git_modified_files": len(_git("status", "--porcelain").splitlines()),
    }


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


# -- CPU accounting -------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(session id, utime + stime ticks) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[3]), int(fields[11]) + int(fields[12])


def session_ticks(sid: int) -> int:
    """CPU ticks used so far by every live process of one session (a server's tree)."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] == sid:
                total += stat[1]
    return total


def pid_ticks(pid: int | None) -> int:
    stat = _proc_stat(pid) if pid else None
    return stat[1] if stat else 0


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of the whole machine (steal: taken by the hypervisor)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = values[3] + values[4], values[7]
    total = sum(values[:8])
    return total - idle - steal, steal, total


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
        with self.logfile.open("wb") as out:
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

    @property
    def sid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

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
        while session_ticks(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


# -- wrk ------------------------------------------------------------------------------------
class Wrk:
    def __init__(self, args: argparse.Namespace, redis_pid: int | None) -> None:
        self.threads = args.wrk_threads
        self.pin = args.wrk_cpu
        self.users = args.users
        self.redis_pid = redis_pid
        self.runs = 0
        self.tag = f"r{int(time.time())}"

    def run(self, server: Server, conns: int, seconds: float,
            think_ms: float = 0) -> dict[str, Any]:
        self.runs += 1
        tag = f"{self.tag}x{self.runs}"
        argv = ["wrk", f"-t{self.threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s",
                "--timeout", "5s", "-s", str(BENCH / "debit.lua"),
                f"http://127.0.0.1:{server.port}", "--", tag, str(self.users)]
        if think_ms > 0:
            argv.append(f"{think_ms:.3f}")
        if self.pin is not None:
            argv = ["taskset", "-c", str(self.pin), *argv]
        env = {**os.environ, "SERVICE_TOKEN": TOKEN, "WRK_PATH": DEBIT_PATH}
        srv0, red0, (busy0, steal0, tot0) = session_ticks(server.sid), \
            pid_ticks(self.redis_pid), machine_ticks()
        kid0 = children_cpu_seconds()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        srv1, red1, (busy1, steal1, tot1) = session_ticks(server.sid), \
            pid_ticks(self.redis_pid), machine_ticks()
        kid1 = children_cpu_seconds()
        match = re.search(r"^WRKJSON (.*)$", done.stdout, re.M)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
        raw = json.loads(match[1])
        requests = raw["requests"]
        secs = raw["duration_us"] / 1e6
        lat = raw["latency_us"]
        non_ok = sum(raw["errors"].values())

        def per_req(ticks: float) -> float:
            return round(ticks / CLK_TCK / max(requests, 1) * 1e6, 1)

        return {
            "connections": conns,
            "think_ms": round(think_ms, 3),
            "seconds": round(secs, 2),
            "requests": requests,
            "rps": round(requests / secs, 1),
            "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000,
            "p99_ms": lat["p99"] / 1000, "p999_ms": lat["p999"] / 1000,
            "mean_ms": round(lat["mean"] / 1000, 3), "max_ms": lat["max"] / 1000,
            "errors": raw["errors"], "non_2xx_or_socket_errors": non_ok,
            "cpu_us_per_request": {
                "server": per_req(srv1 - srv0),
                "redis": per_req(red1 - red0) if self.redis_pid else None,
                "wrk": round((kid1 - kid0) / max(requests, 1) * 1e6, 1),
                "machine": per_req(busy1 - busy0),
            },
            "machine_busy_pct": round(100 * (busy1 - busy0) / max(tot1 - tot0, 1), 1),
            "steal_pct": round(100 * (steal1 - steal0) / max(tot1 - tot0, 1), 1),
        }


def summarize(run: dict[str, Any]) -> str:
    cpu = run["cpu_us_per_request"]
    return (f"c={run['connections']:<4} {run['rps']:>9.0f}/s  p50 {run['p50_ms']:.2f} ms  "
            f"p99 {run['p99_ms']:.2f} ms  errors {run['non_2xx_or_socket_errors']}  "
            f"cpu/req server {cpu['server']} us, redis {cpu['redis']} us, wrk {cpu['wrk']} us, "
            f"machine {run['machine_busy_pct']}% busy, {run['steal_pct']}% stolen")


def peak_attempts(server: Server, wrk: Wrk, conns: int, seconds: float, min_busy: float,
                  retries: int) -> list[dict[str, Any]]:
    """A peak run, run again (up to ``retries`` times) while the machine was under
    ``min_busy`` % busy: then it was not a peak, the machine had CPU to spare (seen here as
    ~67 % busy, the two workers sharing one core for a whole run while wrk had the other).
    Every attempt is returned, the unsaturated ones marked; the last is the one to use."""
    attempts = []
    for attempt in range(1 + retries):
        run = wrk.run(server, conns, seconds)
        log(f"{server.name}: {summarize(run)}")
        attempts.append(run)
        if run["machine_busy_pct"] >= min_busy:
            break
        run["unsaturated"] = True
        if attempt < retries:
            log(f"{server.name}: machine only {run['machine_busy_pct']}% busy, again")
    return attempts


def bench_server(server: Server, wrk: Wrk, args: argparse.Namespace, conns: list[int],
                 paced: bool, result: dict[str, Any], pass_no: int) -> dict[str, Any]:
    """Peak runs at each connection count, then one paced run at half the best peak so far.

    A second pass adds its runs to ``result``: the peak is the best run of all passes, the
    half-peak figure is ``half_peak_run``'s (interference from other tenants of the machine
    only ever lowers throughput and raises latency); every run is kept.
    """
    log(f"{server.name}: pass {pass_no}, warm-up {args.warmup}s")
    wrk.run(server, max(conns), args.warmup)
    runs = result.setdefault("runs", [])
    for c in conns:
        retries = args.unsaturated_retries if server.name in RATIO_PAIR else 0
        for run in peak_attempts(server, wrk, c, args.duration, args.min_busy, retries):
            run["pass"] = pass_no
            runs.append(run)
    peak = result["peak"] = max(runs, key=lambda r: r["rps"])
    if paced:
        target = peak["rps"] / 2
        c = args.paced_connections
        # A connection's cycle = think time + latency + wrk's timer slack: guess ~1 ms for the
        # last two, then correct the think time by the cycle the probes measured.
        cycle = c / target * 1000
        think = max(cycle - 1.0, 0.5)
        for _ in range(args.calibrations):
            probe = wrk.run(server, c, args.calibrate, think)
            log(f"{server.name}: calibration, think {think:.2f} ms -> {probe['rps']:.0f}/s")
            think = max(think + cycle - c / probe["rps"] * 1000, 0.1)
            if abs(probe["rps"] / target - 1) < 0.03:
                break
        run = wrk.run(server, c, args.paced_duration, think)
        run["target_rps"] = round(target, 1)
        run["pass"] = pass_no
        log(f"{server.name}: paced at {target:.0f}/s target -> {summarize(run)}")
        result.setdefault("half_peak_runs", []).append(run)
        result["half_peak"] = half_peak_run(result)
    return result


def interleaved_pairs(servers: dict[str, Server], wrk: Wrk, conns: list[int],
                      rounds: int, seconds: float, min_busy: float) -> dict[str, Any]:
    """(a) measured so that the VM's drift cancels out: both servers are up at once (the
    idle one sleeps in epoll), and wrk loads them in turn, ``rounds`` times; each round
    runs both at every count of ``conns`` (debit, then no-Redis, at each), and a server's
    figure in a round is its best run of the round. A round's ratio compares two peaks
    found within seconds of each other, and the median round is the figure: the host's
    speed moves by a tenth or more within minutes, which a ratio of two peaks measured
    minutes apart takes in whole, and one server's best connection count in pass 1 is
    itself a noisy pick (it differs between the two servers, and between runs)."""
    debit, base = RATIO_PAIR
    for name in RATIO_PAIR:
        wrk.run(servers[name], max(conns), 3)  # warm-up

    def run(name: str, c: int) -> dict[str, Any]:
        return peak_attempts(servers[name], wrk, c, seconds, min_busy, retries=1)[-1]

    pairs = []
    for i in range(rounds):
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in RATIO_PAIR}
        for c in conns:
            for name in RATIO_PAIR:
                runs[name].append(run(name, c))
        best = {name: max(runs[name], key=lambda r: r["rps"]) for name in RATIO_PAIR}
        ratio = best[debit]["rps"] / best[base]["rps"]
        log(f"round {i + 1}/{rounds}: " + ", ".join(
            f"{name} " + " ".join(f"c={r['connections']} {r['rps']:.0f}/s" for r in runs[name])
            for name in RATIO_PAIR) + f"; best {best[debit]['rps']:.0f} / "
            f"{best[base]['rps']:.0f}/s, ratio {ratio:.3f}")
        pairs.append({"ratio": round(ratio, 4), **best,
                      "runs": {name: runs[name] for name in RATIO_PAIR}})
    ratios = sorted(p["ratio"] for p in pairs)
    return {"connections": conns, "seconds": seconds, "pairs": pairs,
            "median_ratio": round(statistics.median(ratios), 4),
            "min_ratio": ratios[0], "max_ratio": ratios[-1]}


def half_peak_run(result: dict[str, Any]) -> dict[str, Any]:
    """The paced run (b) is judged on: of those that reached half the final peak (within
    3 %: a later pass may raise the peak, and a run that fell short of its target, as the
    host drifted after the calibration, ran a lighter load), the lowest p99; when none
    did, the fastest."""
    runs = result["half_peak_runs"]
    reached = [r for r in runs if r["rps"] >= 0.97 * result["peak"]["rps"] / 2]
    if not reached:
        return max(runs, key=lambda r: r["rps"])
    return min(reached, key=lambda r: r["p99_ms"])


# -- setup and cleanup ------------------------------------------------------------------------
async def recreate_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
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


def prepare_users(port: int, users: int) -> None:
    """The bench plan, assigned to every bench user through the API (PostgreSQL + Redis)."""
    status, body = http("PUT", port, "/internal/billing/plans/bench", BENCH_PLAN)
    if status != 200:
        raise RuntimeError(f"PUT plan: {status} {body}")

    async def apply_all() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with gate:
                st, answer = await loop.run_in_executor(
                    None, http, "POST", port, "/internal/billing/plan/apply",
                    {"user_id": f"bu{i}", "plan_code": "bench"})
                if st != 200:
                    raise RuntimeError(f"plan apply bu{i}: {st} {answer}")

        await asyncio.gather(*(one(i) for i in range(users)))

    asyncio.run(apply_all())


# -- redis-benchmark --------------------------------------------------------------------------
def evalsha_benchmark(redis_url: str, env: dict[str, str], args: argparse.Namespace
                      ) -> dict[str, Any]:
    """redis-benchmark on EVALSHA of debit_many.lua with one debit per call, the service's
    own keys and arguments."""
    from core.settings import load_settings
    from lua.source import SCRIPTS
    from quota.engine import debit_args, make_engine

    settings = load_settings(env)
    engine = make_engine(settings)
    user = "rbench0"

    async def prepare() -> Any:
        try:
            await engine.plans.apply(user, "bench", None, "bench")
            reply = await engine.debit(user, "chat", 1_000_000, "rbench-first", caller="service",
                                       action="chat_tokens")
            assert reply.status.name == "OK", reply
        finally:
            await engine.close()

    asyncio.run(prepare())
    windows = engine.calendar.windows(int(time.time() * 1000))
    ref = "rb-__rand_int__"
    # What Engine.debit passes (one tx id for all: the ref makes each call a new debit).
    key_args = list(engine.keys.debit_keys(user, ref, "chat", windows))
    month_key = key_args[4]
    argv = [str(a) for a in (*engine.debit_header(windows), *debit_args(
        user, "chat", 1_000_000, ref, "", "service", "chat_tokens",
        "019ab0c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d"))]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    sha = client.script_load(SCRIPTS["debit_many"].source)
    assert sha == SCRIPTS["debit_many"].sha
    parts = redis.connection.parse_url(redis_url)
    host, port = parts.get("host", "127.0.0.1"), str(parts.get("port", 6379))
    results: dict[str, Any] = {"sha": sha, "keys": key_args, "args": argv}
    for pipeline, requests in ((1, args.rb_requests), (16, args.rb_requests * 2)):
        before = int(client.get(month_key) or 0)
        cmd = ["redis-benchmark", "-h", host, "-p", port, "-c", "50", "-n", str(requests),
               "-P", str(pipeline), "-r", "1000000000", "--csv",
               "EVALSHA", sha, str(len(key_args)), *key_args, *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        # CSV with the command line quoted as the test name (its arguments hold newlines)
        rows = [r for r in csv.reader(io.StringIO(done.stdout)) if r and r[0].startswith("EVALSHA")]
        if not rows:
            raise RuntimeError(f"redis-benchmark printed no result:\n{done.stdout}{done.stderr}")
        fields = rows[-1]
        ok = (int(client.get(month_key) or 0) - before) // 1_000_000
        results[f"P{pipeline}"] = {
            "requests": requests, "clients": 50, "pipeline": pipeline,
            "rps": float(fields[1]), "avg_ms": float(fields[2]), "p50_ms": float(fields[4]),
            "p99_ms": float(fields[6]), "debited_ok": ok,
        }
        log(f"redis-benchmark EVALSHA -P {pipeline}: {float(fields[1]):.0f}/s, "
            f"p50 {fields[4]} ms, p99 {fields[6]} ms, {ok}/{requests} debited")
    client.close()
    return results


# -- report -----------------------------------------------------------------------------------
def verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    d2, nr, pg = (r["servers"][k] for k in ("debit_2w", "noredis_2w", "pg_2w"))
    mem = r["memory"]
    # (a): the median interleaved pair when measured (see interleaved_pairs), else peaks
    pairs = r.get("pairs")
    ratio_a = pairs["median_ratio"] if pairs else d2["peak"]["rps"] / nr["peak"]["rps"]
    p99_b = d2["half_peak"]["p99_ms"]
    ratio_c = d2["peak"]["rps"] / pg["peak"]["rps"]
    per_user = mem["bytes_per_user"]
    return {
        "a": {"value": round(ratio_a, 3), "target": ">= 0.75", "pass": ratio_a >= 0.75},
        "b": {"value": p99_b, "target": "< 5 ms", "pass": p99_b < 5},
        "c": {"value": round(ratio_c, 2), "target": ">= 3", "pass": ratio_c >= 3},
        "d": {"value": per_user, "target": "< 1024 B", "pass": per_user < 1024},
    }


def markdown(r: dict[str, Any]) -> str:
    v = r["verdicts"]
    s = r["servers"]
    mark = {True: "pass", False: "**FAIL**"}

    def row(name: str, what: str, key: str, target: str = "", verdict: str = "") -> str:
        srv = s[key]
        pk = srv["peak"]
        half = srv.get("half_peak")
        half_txt = (f"{half['rps']:.0f}/s: p50 {half['p50_ms']:.2f} / p99 {half['p99_ms']:.2f}"
                    if half else "-")
        cpu = pk["cpu_us_per_request"]
        return (f"| {name} | {what} | {pk['rps']:,.0f} (c={pk['connections']}) | "
                f"{pk['p50_ms']:.2f} / {pk['p99_ms']:.2f} | {half_txt} | "
                f"{cpu['server']:.0f} / {cpu['redis'] if cpu['redis'] is not None else '-'} | "
                f"{target} | {verdict} |")

    rb = r["redis_benchmark"]
    mem = r["memory"]
    pairs = r.get("pairs")
    a_how = (f"(median of {len(pairs['pairs'])} interleaved rounds, each server's best of "
             f"c={'/'.join(str(c) for c in pairs['connections'])}, "
             f"{pairs['min_ratio'] * 100:.0f} to {pairs['max_ratio'] * 100:.0f} %; "
             f"the peaks: {s['debit_2w']['peak']['rps'] / s['noredis_2w']['peak']['rps'] * 100:.0f}"
             " %)") if pairs else "(the peaks)"
    lines = [
        "| # | what | debits/s at peak | p50 / p99 at peak, ms | at half the peak rate: "
        "p50 / p99, ms | CPU µs per request: server / redis | target | result |",
        "|---|---|---|---|---|---|---|---|",
        row("1", "service, 1 worker", "debit_1w"),
        row("2", "service, 2 workers", "debit_2w",
            f"(a) ≥ 75 % of row 3: **{v['a']['value'] * 100:.0f} %** {a_how}; "
            f"(b) p99 < 5 ms at half peak: **{v['b']['value']:.2f} ms**",
            f"(a) {mark[v['a']['pass']]}, (b) {mark[v['b']['pass']]}"),
        row("3", "HTTP only, no Redis call, 2 workers", "noredis_2w"),
        row("4", "one PostgreSQL transaction per debit, 2 workers", "pg_2w",
            f"(c) row 2 ≥ 3 x row 4: **{v['c']['value']:.2f} x**", f"(c) {mark[v['c']['pass']]}"),
        f"| 5 | raw EVALSHA of debit_many.lua (one debit), redis-benchmark -c 50 | "
        f"{rb['P1']['rps']:,.0f} (-P 1); {rb['P16']['rps']:,.0f} (-P 16) | "
        f"{rb['P1']['p50_ms']:.2f} / {rb['P1']['p99_ms']:.2f} (-P 1) | - | - | | |",
        f"| 6 | Redis memory, {mem['users']:,} users x 2 meters | "
        f"**{mem['bytes_per_user']:.0f} B per user** (hash + 2 counters); "
        f"{mem['bytes_per_idempotency_key']:.0f} B per idempotency key; "
        f"{mem['bytes_per_ledger_entry']:.0f} B per unflushed ledger entry; "
        f"{mem['bytes_per_user_with_2_idempotency_keys']:.0f} B per user with its 2 "
        f"idempotency keys | | | | "
        f"(d) < 1 KiB per user | (d) {mark[v['d']['pass']]} |",
    ]
    if "instructions" in r:
        ins = r["instructions"]
        lines.append(
            f"| 7 | instructions per debit (callgrind, batches of {ins['redis']['batch']}) | "
            f"Redis {ins['redis']['instructions_per_debit']:,}; Python client path "
            f"{ins['client']['instructions_per_debit']:,} | | | | | |")
    return "\n".join(lines)


def runs_table(r: dict[str, Any]) -> str:
    """Every wrk run of the benchmark, in order, for the record."""
    lines = ["| server | pass | kind | connections | requests/s | p50 ms | p99 ms | p99.9 ms | "
             "CPU µs/request: server / redis / wrk / whole machine | machine busy % | "
             "stolen % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, srv in r["servers"].items():
        runs = [(run, "peak, unsaturated" if run.get("unsaturated") else "peak")
                for run in srv["runs"]]
        runs += [(run, f"paced, target {run['target_rps']:.0f}/s")
                 for run in srv.get("half_peak_runs", [])]
        for run, kind in sorted(runs, key=lambda x: x[0].get("pass", 1)):
            cpu = run["cpu_us_per_request"]
            redis_cpu = "-" if cpu["redis"] is None else f"{cpu['redis']:.0f}"
            lines.append(
                f"| {name} | {run.get('pass', 1)} | {kind} | {run['connections']} | "
                f"{run['rps']:,.0f} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | "
                f"{run['p999_ms']:.2f} | {cpu['server']:.0f} / {redis_cpu} / {cpu['wrk']:.0f} / "
                f"{cpu['machine']:.0f} | {run['machine_busy_pct']:.0f} | {run['steal_pct']:.1f} |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run the quota gateway benchmark.")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432",
                   help="PostgreSQL server (DSN without a database)")
    p.add_argument("--db", default="qg_bench", help="database to (re)create")
    p.add_argument("--prefix", default="qgbench", help="Redis key prefix of the run")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--duration", type=float, default=8, help="seconds per peak run")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--paced-duration", type=float, default=12)
    p.add_argument("--second-pass", default="debit_2w,noredis_2w,pg_2w",
                   help="servers run a second time at their best connection count")
    p.add_argument("--calibrate", type=float, default=3, help="seconds per calibration probe")
    p.add_argument("--calibrations", type=int, default=2, help="probes at most")
    p.add_argument("--paced-connections", type=int, default=32)
    p.add_argument("--conns-1w", default="16,64")
    p.add_argument("--conns-2w", default="32,64,128,256")
    p.add_argument("--conns-pg", default="16,32,64")
    p.add_argument("--min-busy", type=float, default=85,
                   help="a peak run with the machine less busy than this %% is run again")
    p.add_argument("--unsaturated-retries", type=int, default=1)
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--wrk-cpu", type=int, default=None, help="pin wrk to this CPU (taskset)")
    p.add_argument("--pg-pool", type=int, default=16, help="asyncpg pool per PG-baseline worker")
    p.add_argument("--rb-requests", type=int, default=100_000)
    p.add_argument("--mem-users", type=int, default=10_000)
    p.add_argument("--pairs", type=int, default=6,
                   help="interleaved debit_2w/noredis_2w rounds that (a) is judged on (0 = none)")
    p.add_argument("--pair-seconds", type=float, default=5, help="seconds per run in a round")
    p.add_argument("--pair-conns", default="32,128,256",
                   help="connection counts each server runs at in every round")
    p.add_argument("--diagnose", default="64", metavar="CONNS",
                   help="connection counts of the diagnostic no-Redis variants ('' = skip)")
    p.add_argument("--only", default="",
                   help="run only these (comma list): server names, redis, memory, "
                        "instructions")
    p.add_argument("--out", default=str(BENCH / "results.json"))
    p.add_argument("--keep-keys", action="store_true", help="do not delete the Redis keys")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    for tool in ("wrk", "redis-benchmark"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y wrk redis-tools")
    dsn = f"{args.pg.rstrip('/')}/{args.db}"
    env = {
        **os.environ, "REDIS_URL": args.redis_url, "DB_DSN": dsn, "KEY_PREFIX": args.prefix,
        "SERVICE_TOKEN": TOKEN, "BENCH_PG_DSN": dsn, "BENCH_PG_POOL": str(args.pg_pool),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    logdir = BENCH / "logs"
    logdir.mkdir(exist_ok=True)
    started = time.monotonic()
    result: dict[str, Any] = {"machine": machine_info(args.redis_url, f"{args.pg}/postgres")}
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    log(f"machine: {result['machine']}")

    log(f"recreating database {args.db}; deleting Redis keys {args.prefix}:*")
    asyncio.run(recreate_database(f"{args.pg}/postgres", args.db))
    delete_prefix(args.redis_url, args.prefix)
    subprocess.run([QG, "migrate"], env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([PY, "-m", "bench.pg_baseline", "setup", "--users", str(args.users)],
                   env=env, cwd=ROOT, check=True)
    rpid = redis_pid(args.redis_url)
    wrk = Wrk(args, rpid)
    conns_1w = [int(c) for c in args.conns_1w.split(",")]
    conns_2w = [int(c) for c in args.conns_2w.split(",")]
    conns_pg = [int(c) for c in args.conns_pg.split(",")]
    noredis = [PY, "-m", "bench.noredis_app", "--workers", "2"]
    plan: list[tuple[str, list[str], list[int], bool, dict[str, str]]] = [
        ("debit_1w", [QG, "serve", "--workers", "1"], conns_1w, True, {}),
        ("debit_2w", [QG, "serve", "--workers", "2"], conns_2w, True, {}),
        ("noredis_2w", noredis, conns_2w, True, {}),
        ("pg_2w", [PY, "-m", "bench.pg_baseline", "serve", "--workers", "2"], conns_pg, True,
         {}),
    ]
    if args.diagnose:
        # Split the gap between rows 2 and 3: one event-loop round trip, then also all the
        # Python work of Engine.debit (see bench/noredis_app.py).
        diag = [int(c) for c in args.diagnose.split(",")]
        plan += [
            ("diag_yield_2w", noredis, diag, False, {"BENCH_NOREDIS_MODE": "yield"}),
            ("diag_python_2w", noredis, diag, False, {"BENCH_NOREDIS_MODE": "python"}),
        ]
    only = set(filter(None, args.only.split(",")))
    specs = {name: (argv, extra) for name, argv, _, _, extra in plan}
    schedule = [(name, conns, paced, 1) for name, _, conns, paced, _ in plan]
    # Second pass over the servers the verdicts compare, at their best connection count
    # (filled in when the pass starts), to see and damp the machine's run-to-run noise.
    schedule += [(name, [], name == "debit_2w", 2) for name, _, _, _, _ in plan
                 if name in set(filter(None, args.second_pass.split(",")))]
    result["servers"] = {}
    users_ready = False
    try:
        for name, conns, paced, pass_no in schedule:
            if only and name not in only:
                continue
            argv, extra = specs[name]
            if pass_no > 1:
                conns = [result["servers"][name]["peak"]["connections"]]
            port = free_port()
            server = Server(name, [*argv, "--port", str(port)], {**env, **extra}, port, logdir)
            server.start()
            try:
                if name.startswith("debit") and not users_ready:
                    log(f"assigning the bench plan to {args.users} users")
                    prepare_users(port, args.users)
                    users_ready = True
                status, body = http("POST", port, DEBIT_PATH, {
                    "user_id": "bu0", "action": "chat_tokens", "units": 1,
                    "ref": f"probe-{name}-{time.time_ns()}"})
                if status != 200:
                    raise RuntimeError(f"{name}: probe debit answered {status} {body}")
                result["servers"][name] = bench_server(
                    server, wrk, args, conns, paced, result["servers"].get(name, {}), pass_no)
            finally:
                server.stop()

        if args.pairs and (not only or "pairs" in only):
            conns = [int(c) for c in args.pair_conns.split(",")]
            log(f"(a): {args.pairs} interleaved rounds, each at {conns} connections")
            up = {}
            try:
                for name in RATIO_PAIR:
                    argv, extra = specs[name]
                    port = free_port()
                    up[name] = Server(name, [*argv, "--port", str(port)], {**env, **extra}, port,
                                      logdir)
                    up[name].start()
                if not users_ready:
                    prepare_users(up[RATIO_PAIR[0]].port, args.users)
                    users_ready = True
                result["pairs"] = interleaved_pairs(up, wrk, conns, args.pairs,
                                                    args.pair_seconds, args.min_busy)
            finally:
                for server in up.values():
                    server.stop()
        if not only or "redis" in only:
            log("redis-benchmark: EVALSHA debit_many.lua, one debit per call")
            result["redis_benchmark"] = evalsha_benchmark(args.redis_url, env, args)
        if not only or "memory" in only:
            log(f"memory: {args.mem_users} users on a private redis-server")
            from bench.memory import measure

            result["memory"] = measure(dsn, args.mem_users)
            m = result["memory"]
            log(f"memory: {m['bytes_per_user']} B/user, {m['bytes_per_idempotency_key']} B per "
                f"idempotency key, {m['bytes_per_ledger_entry']} B per ledger entry")
        if (not only or "instructions" in only) and shutil.which("valgrind"):
            log("instructions per debit under callgrind (bench/instructions.py)")
            from bench.instructions import client_side, redis_side

            result["instructions"] = {"redis": redis_side(dsn, args.users, 14, 300),
                                      "client": client_side(14, 2400)}
            i = result["instructions"]
            log(f"instructions per debit: Redis {i['redis']['instructions_per_debit']}, "
                f"Python client path {i['client']['instructions_per_debit']}")
    finally:
        if not args.keep_keys:
            log(f"deleted {delete_prefix(args.redis_url, args.prefix)} keys {args.prefix}:*")
    result["elapsed_seconds"] = round(time.monotonic() - started, 1)
    if not only:
        result["verdicts"] = verdicts(result)
        result["markdown"] = markdown(result)
        result["markdown_runs"] = runs_table(result)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"results in {args.out} ({result['elapsed_seconds']} s)")
    if not only:
        print()
        print(result["markdown"])
        print()
        print(result["markdown_runs"])


if __name__ == "__main__":
    main()
