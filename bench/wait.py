"""The cost of WAIT after debits (REDIS_WAIT_DEBITS) against a primary with one replica.

    .venv/bin/python -m bench.wait [--debits 30000] [--concurrency 64] [--rounds 3]
                                   [--out bench/results/DATE-wait-COMMIT.json]

A private redis-server primary and its replica (``--replicaof``) on 127.0.0.1. One process
runs the real ``Engine.debit`` (batched as in the service; no PostgreSQL: every user and
the catalog are in Redis) with ``--concurrency`` debits in flight, REDIS_WAIT_DEBITS off
and on in interleaved rounds (the best round of each is kept). Per setting: debits/s, the
client's CPU per debit (getrusage), the primary's and the replica's CPU per debit (utime +
stime from /proc/PID/stat), and WAITs sent. Last, a short run with the replica stopped
(SIGSTOP) and REDIS_WAIT_DEBITS on: every WAIT runs out REDIS_WAIT_TIMEOUT_MS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from core import metrics
from core.clock import SystemClock
from core.settings import load_settings
from lua.connection import PipelinedRedis, WaitPolicy
from lua.keys import Keys
from lua.replies import Status
from ops.cluster import cluster_port, redis_server_binary
from quota.engine import Engine

PREFIX, SHARDS = "qgwait", 16
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, s."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_pair(folder: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    ports = cluster_port(), cluster_port()
    procs = []
    for i, port in enumerate(ports):
        data = folder / str(port)
        data.mkdir()
        argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                str(data), "--save", "", "--appendonly", "no"]
        if i:
            argv += ["--replicaof", "127.0.0.1", str(ports[0])]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    return procs, f"redis://127.0.0.1:{ports[0]}/0"


async def wait_online(url: str) -> None:
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(Exception):
            info = await admin.info("replication")
            if info.get("connected_slaves") == 1 and info["slave0"]["state"] == "online":
                break
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not come online")
        await asyncio.sleep(0.05)
    keys = Keys(PREFIX, SHARDS)
    for shard in range(SHARDS):
        await admin.hset(keys.plans(shard), mapping={"~v": "1", "b": "chat",
                                                     "b|chat": f"m:{10**15}"})
    for i in range(1000):
        await admin.hset(keys.user(f"u{i}"), mapping={"loaded": "1", "plan": "b", "exp": "0"})
    await admin.aclose()


def waits_sent() -> float:
    return sum(sample.value for family in metrics.REDIS_WAITS.collect()
               for sample in family.samples if sample.name == "quota_redis_waits_total")


def short_waits() -> float:
    return sum(sample.value for family in metrics.REDIS_WAIT_SHORT.collect()
               for sample in family.samples if sample.name == "quota_redis_wait_short_total")


async def run_round(url: str, procs: list[subprocess.Popen[bytes]], *, wait_debits: bool,
                    debits: int, concurrency: int, tag: str) -> dict[str, Any]:
    settings = load_settings({"REDIS_URL": url, "DB_DSN": "postgresql://unused@127.0.0.1:1/x",
                              "KEY_PREFIX": PREFIX, "N_SHARDS": str(SHARDS),
                              "DEFAULT_PLAN": "b"})
    client = PipelinedRedis(url, timeout_seconds=5, connect_timeout_seconds=5,
                            wait=WaitPolicy(1, settings.redis_wait_timeout_ms, wait_debits))
    engine = Engine(settings, client, None, SystemClock())  # type: ignore[arg-type]
    users = [f"u{i}" for i in range(1000)]
    await engine.debit(users[0], "chat", 1_000_000, f"{tag}-warm", caller="bench")

    async def one(i: int) -> None:
        reply = await engine.debit(users[i % len(users)], "chat", 1_000_000, f"{tag}-{i}",
                                   caller="bench", action="chat_tokens")
        assert reply.status is Status.OK, reply

    waits0, short0 = waits_sent(), short_waits()
    cpu0, primary0, replica0 = own_cpu(), proc_cpu(procs[0].pid), proc_cpu(procs[1].pid)
    started = time.monotonic()
    in_flight: set[asyncio.Task[None]] = set()
    for i in range(debits):  # a steady --concurrency in flight
        if len(in_flight) >= concurrency:
            _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        in_flight.add(asyncio.create_task(one(i)))
    await asyncio.gather(*in_flight)
    elapsed = time.monotonic() - started
    cpu, primary, replica = own_cpu() - cpu0, proc_cpu(procs[0].pid) - primary0, \
        proc_cpu(procs[1].pid) - replica0
    await engine.guard.close()
    await client.close()
    return {"wait_debits": wait_debits, "debits": debits,
            "debits_per_second": round(debits / elapsed),
            "client_us_cpu_per_debit": round(cpu / debits * 1e6, 1),
            "primary_us_cpu_per_debit": round(primary / debits * 1e6, 1),
            "replica_us_cpu_per_debit": round(replica / debits * 1e6, 1),
            "waits": int(waits_sent() - waits0), "short": int(short_waits() - short0)}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qg-bench-wait-") as tmp:
        procs, url = start_pair(Path(tmp))
        try:
            await wait_online(url)
            rounds: list[dict[str, Any]] = []
            for r in range(args.rounds):
                for on in (False, True):
                    result = await run_round(url, procs, wait_debits=on, debits=args.debits,
                                             concurrency=args.concurrency, tag=f"r{r}{on}")
                    print(result, flush=True)
                    rounds.append(result)
            os.kill(procs[1].pid, signal.SIGSTOP)
            try:
                stopped = await run_round(url, procs, wait_debits=True, debits=2000,
                                          concurrency=args.concurrency, tag="stopped")
            finally:
                os.kill(procs[1].pid, signal.SIGCONT)
            print("replica stopped:", stopped, flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    best = {on: max((r for r in rounds if r["wait_debits"] is on),
                    key=lambda r: r["debits_per_second"]) for on in (False, True)}
    commit = await asyncio.to_thread(lambda: subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        check=False).stdout.strip())
    report = {"bench": "wait", "date": date.today().isoformat(), "commit": commit,
              "cpus": os.cpu_count(), "concurrency": args.concurrency,
              "redis_wait_timeout_ms": 100, "off": best[False], "on": best[True],
              "replica_stopped": stopped, "rounds": rounds}
    out = Path(args.out or f"bench/results/{report['date']}-wait-{commit}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    asyncio.run(main())
