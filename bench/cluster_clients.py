"""Which client for Redis Cluster on the hot path: 64 concurrent EVALSHA of a two-key script.

    .venv/bin/python -m bench.cluster_clients [--calls N] [--rounds R] [--out FILE]

Starts a private redis-server and a private 3-primary Redis Cluster (no replicas: the
figures are the client's), then, for each client, runs ``--calls`` EVALSHA of a script that
INCRs two keys of one hash slot, 64 in flight in one process, keys spread over 256 hash
tags (so over every primary of the cluster), and reports calls/s and this process's CPU per
call (``resource.getrusage``: every thread, a client's native threads included). Clients:
our pipelined client (``lua/connection.py``) and its slot-routed form (``lua/cluster.py``),
redis-py's asyncio ``Redis`` / ``RedisCluster`` (with hiredis), and, when importable
(``BENCH_EXTRA_PATH`` may name a folder they were installed to with ``pip --target``),
valkey-glide and coredis. Each client runs ``--rounds`` times, interleaved; its best round
is its figure (the 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from lua.cluster import ClusterRedis
from lua.connection import PipelinedRedis
from lua.source import Script
from ops.cluster import LocalCluster
from ops.devservers import EmbeddedRedis

SOURCE = "return redis.call('INCR', KEYS[1]) + redis.call('INCR', KEYS[2])"
SCRIPT = Script("bench_two_keys", SOURCE, __import__("hashlib").sha1(SOURCE.encode()).hexdigest())
CONCURRENCY = 64
TAGS = [f"bench:{{{i:03d}}}" for i in range(256)]

Call = Callable[[list[str]], Awaitable[Any]]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drive(call: Call, calls: int) -> dict[str, float]:
    """``calls`` calls, CONCURRENCY in flight; calls/s and CPU µs per call."""
    per_task = calls // CONCURRENCY

    async def worker(w: int) -> None:
        for i in range(per_task):
            tag = TAGS[(w * per_task + i) % len(TAGS)]
            await call([f"{tag}:a", f"{tag}:b"])

    await asyncio.gather(*(worker(w) for w in range(8)))  # warm up connections and scripts
    cpu, wall = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    done = per_task * CONCURRENCY
    return {"calls_per_s": round(done / wall), "cpu_us_per_call": round(cpu / done * 1e6, 1)}


async def own(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = PipelinedRedis(url, timeout_seconds=5, connect_timeout_seconds=5)
    return (lambda keys: client.run_script(SCRIPT, keys, ())), client.close


async def own_cluster(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = ClusterRedis(url, timeout_seconds=5, connect_timeout_seconds=5)
    return (lambda keys: client.run_script(SCRIPT, keys, ())), client.close


async def redispy(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = aioredis.Redis.from_url(url, max_connections=CONCURRENCY)
    script = client.register_script(SOURCE)
    return (lambda keys: script(keys=keys)), client.aclose


async def redispy_cluster(seeds: list[tuple[str, int]]
                          ) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds])
    await client.initialize()
    script = client.register_script(SOURCE)
    return (lambda keys: script(keys=keys)), client.aclose


async def glide_client(seeds: list[tuple[str, int]], cluster: bool
                ) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from glide import (  # type: ignore[import-not-found]
        GlideClient,
        GlideClientConfiguration,
        GlideClusterClient,
        GlideClusterClientConfiguration,
        NodeAddress,
    )
    from glide import Script as GScript
    addresses = [NodeAddress(h, p) for h, p in seeds]
    if cluster:
        client: Any = await GlideClusterClient.create(
            GlideClusterClientConfiguration(addresses))
    else:
        client = await GlideClient.create(GlideClientConfiguration(addresses))
    script = GScript(SOURCE)
    return (lambda keys: client.invoke_script(script, keys=keys)), client.close


async def coredis_client(seeds: list[tuple[str, int]], cluster: bool
                         ) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import coredis  # type: ignore[import-not-found]
    if cluster:
        client: Any = coredis.RedisCluster(startup_nodes=[{"host": h, "port": p}
                                                          for h, p in seeds])
    else:
        client = coredis.Redis(host=seeds[0][0], port=seeds[0][1], max_connections=CONCURRENCY)
    if hasattr(client, "__aenter__"):  # coredis 5+: the pool lives in the context
        await client.__aenter__()
    script = client.register_script(SOURCE)

    async def close() -> None:
        if hasattr(client, "__aexit__"):
            await client.__aexit__(None, None, None)
    return (lambda keys: script(keys=keys)), close


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="qg-bench-cluster-"))
    single = EmbeddedRedis(tmp / "single")
    single_url = single.start()
    cluster = LocalCluster(tmp / "cluster", primaries=3, replicas=0, appendonly=False)
    cluster_url = cluster.start()
    single_seed = [("127.0.0.1", single.port)]
    cluster_seeds = [("127.0.0.1", n.port) for n in cluster.nodes]
    variants: dict[str, Callable[[], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]] = {
        "own, one Redis": lambda: own(single_url),
        "own + slot routing, cluster": lambda: own_cluster(cluster_url),
        "redis-py asyncio, one Redis": lambda: redispy(single_url),
        "redis-py asyncio RedisCluster": lambda: redispy_cluster(cluster_seeds),
    }
    extra = os.environ.get("BENCH_EXTRA_PATH")
    if extra:
        sys.path.append(extra)
    try:
        import glide  # type: ignore[import-not-found]  # noqa: F401
        variants["valkey-glide, one Redis"] = lambda: glide_client(single_seed, False)
        variants["valkey-glide, cluster"] = lambda: glide_client(cluster_seeds, True)
    except ImportError:
        print("valkey-glide not importable: skipped")
    try:
        import coredis  # type: ignore[import-not-found]  # noqa: F401
        variants["coredis, one Redis"] = lambda: coredis_client(single_seed, False)
        variants["coredis, cluster"] = lambda: coredis_client(cluster_seeds, True)
    except ImportError:
        print("coredis not importable: skipped")
    best: dict[str, dict[str, float]] = {}
    try:
        for round_ in range(args.rounds):
            for name, make in variants.items():
                if args.only and args.only not in name:
                    continue
                call, close = await make()
                try:
                    figures = await drive(call, args.calls)
                finally:
                    await close()
                print(f"round {round_ + 1} {name}: {figures}", flush=True)
                if name not in best or figures["cpu_us_per_call"] < best[name]["cpu_us_per_call"]:
                    best[name] = figures
    finally:
        cluster.stop()
        single.stop()
    return {"bench": "cluster_clients", "calls": args.calls, "concurrency": CONCURRENCY,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg()[0], "results": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=64_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="run only the clients whose name has this")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster_clients.json"))
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=2))


if __name__ == "__main__":
    main()
