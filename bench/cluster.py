"""Debits/s and CPU per debit against one Redis and a local 3-primary Redis Cluster, with
1, 2 and 4 service processes (#19).

    .venv/bin/python -m bench.cluster [--workers 1,2,4] [--seconds 8] [--connections 64]
                                      [--users 2000] [--pg postgresql://postgres@127.0.0.1:5432]

Per run: a database of its own on the PostgreSQL of ``--pg`` (migrated), private Redis
servers (one ``redis-server``, or ``ops/cluster.py``'s LocalCluster: 3 primaries, no
replicas, no AOF), ``quota-gateway serve --workers N`` and one ``quota-gateway reconcile``;
``--users`` users on the bench plan, loaded; then ``wrk -t1 -c64`` on POST /quota/debit
(bench/debit.lua, as ``make bench``). CPU per debit from /proc (utime + stime, reaped
children included): the workers, the reconciler, PostgreSQL, and each redis-server on its
own. The result goes to bench/results/<date>-cluster-<commit>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.run import (
    QG,
    ROOT,
    TOKEN,
    Cpu,
    Server,
    Wrk,
    free_port,
    postmaster_pid,
    prepare_users,
    recreate_database,
    session_of,
    tree_of,
)
from ops.cluster import LocalCluster, cluster_port, redis_server_binary

DB = "qg_bench_cluster"


def one_redis(folder: Path) -> tuple[str, list[int], subprocess.Popen[bytes]]:
    port = cluster_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(folder), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return f"redis://127.0.0.1:{port}/0", [proc.pid], proc


def run_one(topology: str, workers: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    folder = tmp / f"{topology}-{workers}"
    folder.mkdir()
    cluster: LocalCluster | None = None
    single: subprocess.Popen[bytes] | None = None
    if topology == "cluster":
        cluster = LocalCluster(folder / "c", primaries=3, replicas=0, appendonly=False)
        url = cluster.start()
        primaries = {n.address: n.client().info("server")["process_id"]
                     for n in cluster.primary_nodes()}
    else:
        url, pids, single = one_redis(folder)
        primaries = {url.split("//")[1].split("/")[0]: pids[0]}
    dsn = f"{args.pg.rstrip('/')}/{DB}"
    asyncio.run(recreate_database(f"{args.pg.rstrip('/')}/postgres", DB))
    env = {**os.environ, "REDIS_URL": url, "DB_DSN": dsn, "KEY_PREFIX": "qgbc",
           "SERVICE_TOKEN": TOKEN, "PYTHONPATH": str(ROOT), "DB_POOL_MAX": "4"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    subprocess.run([QG, "migrate"], env=env, check=True, capture_output=True)
    port, metrics_port = free_port(), free_port()
    service = Server("service", [QG, "serve", "--workers", str(workers), "--port", str(port)],
                     env, port, folder)
    reconciler = Server("reconciler", [QG, "reconcile", "--metrics-port", str(metrics_port)],
                        env, metrics_port, folder)
    try:
        reconciler.start()
        service.start()
        prepare_users(port, dsn, args.users)
        groups = {"workers": session_of(service), "reconciler": session_of(reconciler),
                  "postgres": tree_of(postmaster_pid(f"{args.pg.rstrip('/')}/postgres"))}
        for address, pid in primaries.items():
            groups[f"redis {address}"] = tree_of(int(pid))
        wrk = Wrk(args.users)
        run = wrk.run(port, args.connections, args.seconds, Cpu(groups))
    finally:
        service.stop()
        reconciler.stop()
        if cluster is not None:
            cluster.stop()
        if single is not None:
            single.terminate()
            single.wait(10)
    us = run["cpu_us_per_op"]
    redis_us = {k.removeprefix("redis "): v for k, v in us.items() if k.startswith("redis ")}
    row = {"topology": topology, "workers": workers, "debits_per_second": run["rps"],
           "p99_ms": run["p99_ms"], "errors": run["non_2xx_or_socket_errors"],
           "us_cpu_per_debit": {"workers": us["workers"], "reconciler": us["reconciler"],
                                "postgres": us["postgres"], "wrk": us["wrk"],
                                "redis_per_node": redis_us,
                                "redis_total": round(sum(redis_us.values()), 1)},
           "machine_busy_pct": run["machine_busy_pct"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--topologies", default="one,cluster")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qg-bench-cluster-") as tmp:
        for topology in args.topologies.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                rows.append(run_one(topology, workers, args, Path(tmp)))
    asyncio.run(recreate_database(f"{args.pg.rstrip('/')}/postgres", DB, drop_only=True))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False, cwd=ROOT).stdout.strip()
    today = dt.date.today().isoformat()
    report = {"bench": "cluster", "date": today, "commit": commit, "cpus": os.cpu_count(),
              "connections": args.connections, "seconds": args.seconds, "users": args.users,
              "rows": rows}
    out = Path(args.out or ROOT / f"bench/results/{today}-cluster-{commit}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
