"""The hot path's client for Redis Cluster: the pipelined client per primary, routed by slot.

``REDIS_URL=redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` for TLS)
names seed nodes. The client reads the slot table (``CLUSTER SLOTS``) from the first seed
that answers and keeps one ``PipelinedRedis`` per primary, so pipelining and the batching
of debits stay per node; a batch call carries the items of one hash slot only (a user's
keys share the virtual shard's tag ``{NNN}``: one slot per script call).

* Each new node connection loads every script (``SCRIPT LOAD``) before it serves, so a
  primary never answers NOSCRIPT in normal operation (the EVAL fallback stays).
* ``MOVED``: the slot's owner is taken from the reply, the table is read again in the
  background, the call is sent again (at most ``MAX_REDIRECTS`` times).
* ``ASK`` (a slot being migrated): ``ASKING`` and the call on the target, once.
* ``TRYAGAIN``: sent again after a short wait. ``CLUSTERDOWN``: 503.
* A node that cannot be reached or does not answer: 503 for its calls (as with one Redis)
  and the table is read again (at most every ``REFRESH_MIN_SECONDS``), so a promoted
  replica is found as soon as the cluster says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from core.errors import InvariantBroken
from lua.connection import WAITED_BATCHES, PipelinedRedis, RedisUnavailable, WaitPolicy
from lua.resp import Batch, RedisReplyError
from lua.source import SCRIPTS, Script

log = logging.getLogger("quota_gateway.cluster")

SLOTS = 16384
#: How often one call follows MOVED/ASK/TRYAGAIN before it answers 503.
MAX_REDIRECTS = 8
#: The slot table is read again at most this often after a node failed.
REFRESH_MIN_SECONDS = 0.25
#: How long a call waits after its n-th TRYAGAIN, times n (a multi-key call during a
#: slot migration: about 1.4 s in all before it answers 503).
TRYAGAIN_SECONDS = 0.05
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

#: ``on_node_connect(execute, address)``: run on every new node connection before it
#: serves; raising RedisUnavailable refuses it (lua/instance.py, per node).
NodeCheck = Callable[[Callable[..., Awaitable[Any]], str], Awaitable[None]]


def is_cluster_url(url: str | None) -> bool:
    """Whether REDIS_URL names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return bool(url) and str(url).split("://", 1)[0] in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seeds ``[(host, port)]`` and the options (tls, username, password) of a
    ``redis+cluster://[user:password@]host:port[,host:port...]`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {scheme!r}")
    rest = rest.split("/", 1)[0].split("?", 1)[0]  # a cluster has database 0 only
    userinfo, _, hosts = rest.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None, unquote(secret)) if colon else \
            (None, unquote(user))
    seeds = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name:
            name, port = port, "6379"
        seeds.append((name.strip("[]") or "127.0.0.1", int(port)))
    if not seeds:
        raise ValueError("a Redis Cluster URL names at least one host:port")
    return seeds, {"tls": scheme == "rediss+cluster", "username": username,
                   "password": password}


def slot_of(key: str) -> int:
    """The hash slot of a key (its ``{tag}`` when it has one)."""
    return key_slot(key.encode())


def _redirect(message: str) -> tuple[str, int, str] | None:
    """('MOVED' or 'ASK', slot, 'host:port') of a redirection error reply, else None."""
    if message.startswith(("MOVED ", "ASK ")):
        kind, slot, address = message.split()[:3]
        return kind, int(slot), address
    return None


class ClusterRedis:
    """Slot-routed pipelined clients, one per primary; the interface of PipelinedRedis."""

    cluster = True

    def __init__(self, url: str, *, timeout_seconds: float, connect_timeout_seconds: float,
                 connections: int = 1, wait: WaitPolicy | None = None) -> None:
        self.seeds, self.options = parse_cluster_url(url)
        self.wait = wait  # each primary's client WAITs for its own replicas
        self.timeout = timeout_seconds
        self.connect_timeout = connect_timeout_seconds
        self.connections = connections
        self.table: list[str] = []  # slot -> "host:port" of its primary
        self.replicas: dict[str, list[str]] = {}  # primary -> its replicas, as last read
        self.nodes: dict[str, PipelinedRedis] = {}
        self.on_node_connect: NodeCheck | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._closed = False

    # -- the slot table -------------------------------------------------------------------
    def node_url(self, address: str) -> str:
        """The redis:// URL of one node (credentials and TLS as the cluster URL's)."""
        opts = self.options
        auth = ""
        if opts["password"] is not None:
            user = quote(opts["username"] or "", safe="")
            auth = f"{user}:{quote(opts['password'], safe='')}@"
        return f"{'rediss' if opts['tls'] else 'redis'}://{auth}{address}/0"

    async def _read_table(self) -> None:
        """CLUSTER SLOTS from the first node that answers (known primaries, then seeds)."""
        candidates = list(dict.fromkeys(
            [*self.nodes, *(f"{h}:{p}" for h, p in self.seeds),
             *(r for rs in self.replicas.values() for r in rs)]))
        errors = []
        for address in candidates:
            probe = PipelinedRedis(self.node_url(address), timeout_seconds=self.timeout,
                                   connect_timeout_seconds=self.connect_timeout)
            try:
                reply = await probe.execute("CLUSTER", "SLOTS")
            except (RedisUnavailable, RedisReplyError) as exc:
                errors.append(f"{address}: {exc}")
                continue
            finally:
                await probe.close()
            self._install(reply, address.rpartition(":")[0])
            return
        raise RedisUnavailable(f"no Redis Cluster node answered CLUSTER SLOTS: {errors}")

    def _install(self, reply: list[Any], queried_host: str) -> None:
        table = [""] * SLOTS
        replicas: dict[str, list[str]] = {}
        for first, last, primary, *others in reply:
            address = f"{primary[0] or queried_host}:{primary[1]}"
            table[first:last + 1] = [address] * (last - first + 1)
            replicas[address] = [f"{r[0] or queried_host}:{r[1]}" for r in others]
        if "" in table:
            log.warning("Redis Cluster: %d slots have no primary", table.count(""))
        self.table, self.replicas = table, replicas
        self._refreshed_at = time.monotonic()
        for address in [a for a in self.nodes if a not in replicas]:  # no longer a primary
            node = self.nodes.pop(address)
            asyncio.get_running_loop().create_task(node.close())

    async def _ensure_table(self) -> None:
        if not self.table:
            await self.refresh()

    async def refresh(self) -> None:
        """Read the slot table again (one read at a time; concurrent callers share it)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read_table(), name="cluster-slots")
        await asyncio.shield(self._refresh)

    def refresh_soon(self) -> None:
        """Read the slot table again in the background, unless it was read just now."""
        if self._closed or time.monotonic() - self._refreshed_at < REFRESH_MIN_SECONDS:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read_table(), name="cluster-slots")
            self._refresh.add_done_callback(_quiet)

    def address_of(self, slot: int) -> str:
        """The primary serving ``slot`` in the table as last read ('' when none)."""
        return self.table[slot] if self.table else ""

    def shards_served(self, address: str, slots: Sequence[int]) -> list[int]:
        """The indexes of ``slots`` that ``address`` serves, as the table says."""
        return [i for i, slot in enumerate(slots) if self.table[slot] == address]

    def _node(self, address: str) -> PipelinedRedis:
        node = self.nodes.get(address)
        if node is None:
            node = self.nodes[address] = PipelinedRedis(
                self.node_url(address), timeout_seconds=self.timeout,
                connect_timeout_seconds=self.connect_timeout, connections=self.connections,
                wait=self.wait)
            node.on_connect = lambda execute: self._connected(execute, address)
        return node

    async def _connected(self, execute: Callable[..., Awaitable[Any]], address: str) -> None:
        """A new connection to ``address``: load every script, then the node check."""
        await asyncio.gather(*(execute("SCRIPT", "LOAD", s.source) for s in SCRIPTS.values()))
        if self.on_node_connect is not None:
            await self.on_node_connect(execute, address)

    async def _node_of(self, slot: int) -> PipelinedRedis:
        if not self.table:
            await self.refresh()
        address = self.table[slot]
        if not address:
            self.refresh_soon()
            raise RedisUnavailable(f"Redis Cluster: no primary serves slot {slot}")
        return self._node(address)

    # -- calls ----------------------------------------------------------------------------
    async def _routed(self, slot: int, call: Callable[[PipelinedRedis], Awaitable[Any]],
                      asking: Callable[[PipelinedRedis], Awaitable[Any]]) -> Any:
        """Run ``call`` on the slot's primary, following redirections: MOVED (the table
        learns the new owner), ASK (``asking`` on the importing node, once), TRYAGAIN (a
        multi-key call while its slot migrates: the owner again after a short wait)."""
        node, ask = await self._node_of(slot), False
        for attempt in range(MAX_REDIRECTS):
            try:
                return await (asking(node) if ask else call(node))
            except RedisUnavailable:
                self.refresh_soon()  # a failover may be under way
                raise
            except RedisReplyError as exc:
                message = str(exc)
                moved = _redirect(message)
                if moved is not None:
                    kind, moved_slot, address = moved
                    ask = kind == "ASK"
                    if not ask:
                        self.table[moved_slot] = address
                        self.refresh_soon()
                    node = self._node(address)
                elif message.startswith("TRYAGAIN"):
                    await asyncio.sleep(TRYAGAIN_SECONDS * (attempt + 1))
                    node, ask = await self._node_of(slot), False
                elif message.startswith("CLUSTERDOWN"):
                    self.refresh_soon()
                    raise RedisUnavailable(f"Redis Cluster is down: {message}") from None
                else:
                    raise
        raise RedisUnavailable(f"Redis Cluster: slot {slot} still redirected after "
                               f"{MAX_REDIRECTS} tries")

    async def execute(self, *args: str | int | bytes) -> Any:
        """One command, on the primary of its first key (a command without keys: any)."""
        slot = _command_slot(args)
        if slot is None:
            await self._ensure_table()
            node = self._node(next(a for a in self.table if a))
            return await node.execute(*args)
        return await self._routed(slot, lambda n: n.execute(*args),
                                  lambda n: n.execute_asking(*args))

    async def run_script(self, script: Script, keys: Sequence[str],
                         args: Sequence[str | int | bytes], *, wait: bool = False) -> Any:
        """EVALSHA (EVAL after NOSCRIPT) on the primary of the keys' slot; with ``wait``,
        WAIT for that primary's replicas on the same connection."""
        if not keys:
            raise InvariantBroken(f"{script.name}: a script without keys has no slot")
        wait_op = script.name if wait else ""
        return await self._routed(
            slot_of(keys[0]), lambda n: n.run_script(script, keys, args, wait=wait),
            lambda n: n.execute_asking("EVAL", script.source, len(keys), *keys, *args,
                                       wait_op=wait_op))

    async def run_batched(self, script: Script, header: tuple[str | int, ...],
                          keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        """One item of a batch call; items share a call per node and slot."""
        slot = slot_of(keys[0])
        return await self._routed(
            slot, lambda n: n.run_batched(script, header, keys, args, slot),
            lambda n: self._asking_item(n, script, header, keys, args))

    @staticmethod
    async def _asking_item(node: PipelinedRedis, script: Script, header: tuple[str | int, ...],
                           keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        """A batch item alone, by ASKING + EVAL (a slot in migration: rare)."""
        batch = Batch(script, header)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch.futures.append(future)
        wait_op = script.name if node.wait is not None and node.wait.debits \
            and script.name in WAITED_BATCHES else ""
        reply = await node.execute_asking("EVAL", script.source, len(keys), *keys, *header,
                                          *args, wait_op=wait_op)
        batch.resolve(reply)
        return await future

    async def node_status(self) -> dict[str, str]:
        """Each primary of the slot table, as last read (re-read when empty), and whether
        it serves: ``ok``, or why not (cannot connect, no answer, refused by the node check
        as back with older data). A PING on a pooled connection: a node not yet connected
        is connected, scripts loaded and checked, as a call would."""
        await self._ensure_table()
        addresses = sorted({a for a in self.table if a})

        async def ping(address: str) -> str:
            try:
                await self._node(address).execute("PING")
            except (RedisUnavailable, RedisReplyError) as exc:
                self.refresh_soon()
                return f"unavailable: {getattr(exc, 'message', exc)}"
            return "ok"

        status = dict(zip(addresses, await asyncio.gather(*(ping(a) for a in addresses)),
                          strict=True))
        unserved = self.table.count("")
        if unserved:
            status["unassigned"] = f"unavailable: {unserved} slots have no primary"
        return status

    def slot_groups(self, keys: Sequence[str]) -> list[list[str]]:
        """``keys`` split into groups of one slot each (a script call's keys), in order."""
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(slot_of(key), []).append(key)
        return list(groups.values())

    async def close(self) -> None:
        """Close every node's connections."""
        self._closed = True
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh
        nodes, self.nodes = self.nodes, {}
        await asyncio.gather(*(node.close() for node in nodes.values()))


#: Commands without keys, sent to any primary.
_KEYLESS = frozenset({"PING", "INFO", "TIME", "SCRIPT", "CLUSTER", "ECHO"})


def _command_slot(args: Sequence[str | int | bytes]) -> int | None:
    name = str(args[0]).upper()
    if name in _KEYLESS or len(args) < 2:
        return None
    if name in ("EVAL", "EVALSHA"):
        return slot_of(str(args[3])) if len(args) > 3 and int(args[2]) > 0 else None
    key = args[1]
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


def _quiet(task: asyncio.Task[None]) -> None:
    """A background table read that failed is logged; the next failure tries again."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("Redis Cluster: reading the slot table failed: %s", task.exception())


#: The hot path's client, whichever REDIS_URL names.
HotRedis = PipelinedRedis | ClusterRedis


def hot_path_client(url: str, *, timeout_seconds: float, connect_timeout_seconds: float,
                    connections: int = 1, wait: WaitPolicy | None = None) -> HotRedis:
    """The pipelined client for one Redis, or its slot-routed form for a cluster URL."""
    kind = ClusterRedis if is_cluster_url(url) else PipelinedRedis
    return kind(url, timeout_seconds=timeout_seconds,
                connect_timeout_seconds=connect_timeout_seconds, connections=connections,
                wait=wait)


def admin_client(url: str, **options: Any) -> aioredis.Redis:
    """redis-py's asyncio client for everything off the hot path (reconciler, rebuild,
    admin): ``RedisCluster`` for a cluster URL, else ``Redis``. Typed as ``Redis``: the
    commands used off the hot path are single-key (or pipelined per key), which both
    clients take alike."""
    if not is_cluster_url(url):
        return aioredis.Redis.from_url(url, **options)
    seeds, opts = parse_cluster_url(url)
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        username=opts["username"], password=opts["password"], ssl=opts["tls"], **options)
    return cast(aioredis.Redis, cluster)
