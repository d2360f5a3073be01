"""Batch debits against single debits, as deployed: `serve --workers 2 --with-reconciler`
on the machine's Redis and PostgreSQL (a database and key prefix of its own), driven by
wrk from the same 2 cores (issue #21: a batch of 100 at >= 5 x the single-debit rate).

For each shape it reports debits/s, request p50/p99 and the CPU per debit of the workers
(the serve process and its uvicorn workers), the reconciler child, Redis and PostgreSQL,
read from /proc before and after the run.

    python -m bench.batch [--seconds 10] [--items 100]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from ops.devservers import free_port

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of the processes and their descendants still running."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def tree(root: int) -> list[int]:
    """A process and its descendants."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                if ppid == pid:
                    todo.append(int(entry.name))
    return found


def by_name(pattern: str) -> list[int]:
    """Processes whose command line matches (Redis, PostgreSQL backends)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if re.search(pattern, cmd):
                pids.append(int(entry.name))
    return pids


def wrk(url: str, script: str, conns: int, seconds: int, *args: str) -> dict[str, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "-s", script, url,
                          "--", *args], capture_output=True, text=True, check=True).stdout
    data = json.loads(out.split("WRKJSON ", 1)[1].splitlines()[0])
    if "latency_us" in data:  # debit.lua's fuller summary
        data = {"requests": data["requests"], "duration_us": data["duration_us"],
                "status_errors": data["errors"]["status"],
                "p50_us": data["latency_us"]["p50"], "p99_us": data["latency_us"]["p99"]}
    return dict(data)


def measure(url: str, service: int, script: str, conns: int, seconds: int, per_request: int,
            *args: str) -> dict[str, float]:
    everything = tree(service)
    reconciler = [p for p in everything if p in by_name(r"ops\.cli reconcile")]
    groups = {"workers": [p for p in everything if p not in reconciler],
              "reconciler": reconciler, "redis": by_name(r"redis-server .*:6379"),
              "postgres": by_name(r"^postgres")}
    before = {k: cpu_ticks(v) for k, v in groups.items()}
    result = wrk(url, script, conns, seconds, *args)
    after = {k: cpu_ticks(v) for k, v in groups.items()}
    debits = result["requests"] * per_request
    rate = debits / (result["duration_us"] / 1e6)
    cpu = {k: round((after[k] - before[k]) / TICK / max(debits, 1) * 1e6, 1) for k in groups}
    return {"debits_per_second": round(rate), "requests": result["requests"],
            "status_errors": result["status_errors"], "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000, "cpu_us_per_debit": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    name = f"qg_bench_batch_{secrets.token_hex(3)}"
    subprocess.run(["psql", ADMIN_DSN, "-qc", f'CREATE DATABASE "{name}"'], check=True)
    port, prefix = free_port(), f"qgb{secrets.token_hex(3)}"
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:6379/0",
           "DB_DSN": f"postgresql://postgres@127.0.0.1:5432/{name}", "KEY_PREFIX": prefix,
           "BATCH_MAX_ITEMS": str(args.items), "WORKERS": "2"}
    service = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", "--migrate",
                                "--with-reconciler", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        headers = {"X-Internal-Key": "super-secret-dev"}
        with httpx.Client(base_url=url, headers=headers) as http:  # room for every debit
            for u in range(args.users):
                http.post("/internal/billing/plan/apply",
                          json={"user_id": f"bu{u}", "plan_code": "pro_month"})
        os.chdir(ROOT)
        wrk(url, "bench/debit.lua", 64, 2, "warm", str(args.users))
        single = measure(url, service.pid, "bench/debit.lua", 64, args.seconds, 1, "single",
                         str(args.users))
        batch = measure(url, service.pid, "bench/batch.lua", 16, args.seconds, args.items,
                        "batch", str(args.users), str(args.items))
    finally:
        service.terminate()
        service.wait(60)
        subprocess.run(["psql", ADMIN_DSN, "-qc", f'DROP DATABASE IF EXISTS "{name}"'],
                       check=False)
        # the shared Redis keeps nothing of the run (its refs would live 7 days, and every
        # test that scans by prefix would walk them)
        keys = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        batch = []
        for key in keys.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) == 1000:
                keys.unlink(*batch)
                batch = []
        if batch:
            keys.unlink(*batch)
        keys.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    result = {"date": datetime.now(tz=UTC).isoformat(timespec="seconds"), "commit": commit,
              "host_cores": os.cpu_count(), "seconds": args.seconds, "items": args.items,
              "single": single, "batch": batch,
              "ratio": round(batch["debits_per_second"] / single["debits_per_second"], 2)}
    out = ROOT / "bench" / "results" / f"{result['date'][:10]}-batch-{commit}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
