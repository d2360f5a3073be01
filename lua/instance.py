"""A Redis that comes back older than it was: found on connect, rebuilt from PostgreSQL.

Redis restarted from its AOF or RDB after a machine loss (``appendfsync everysec`` loses
the last second), or a replica promoted after a failover, can hold data older than what
the services answered and the reconciler flushed: usage and idempotency keys of the lost
writes are missing, a credit applied from the outbox may be gone. Its users are still
marked loaded, so nothing would be rebuilt: free quota, and retries debited twice.

Every new hot-path connection is checked before it serves (``PipelinedRedis.on_connect``).
The key ``<prefix>:{meta}:instance`` holds the ``run_id`` of the Redis process whose data
the services have kept in step with PostgreSQL:

* the same run_id: the connection serves;
* no key: an empty Redis (or one never checked): the key is set, the connection serves;
* another run_id: the data came from a file or another server. The connection is refused
  (503) and one process (redis-py's token lock ``<prefix>:{meta}:recovery``) rebuilds: it
  waits until the reconcilers have flushed every ledger stream (the surviving events reach
  PostgreSQL), deletes every user state hash and shard catalog copy (users and plans then
  load from PostgreSQL on first use: usage, credits, plans and the idempotency keys of
  their refs), and records the new run_id. Connections serve again from then on. The lock
  is renewed, by its token, at every poll and every SCAN page, and each page is deleted
  only while the lock is still this process's and the run_id is not recorded yet.

No reconciler running means no rebuild: the service answers 503 and says why, rather than
serve from data it cannot trust.

Nor does a connection serve from a Redis that may evict keys (any ``maxmemory-policy`` but
``noeviction``; the volatile ones too, as every counter has a TTL): a period counter evicted
while its user's hash stays would read as a new period, a free reset. It is refused (503,
and ``/ready`` says why) until the policy is ``noeviction``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock

from lua.cluster import ClusterRedis, admin_client, slot_of
from lua.connection import RedisUnavailable
from lua.keys import Keys
from lua.resp import RedisReplyError

log = logging.getLogger("quota_gateway.instance")

#: The rebuild lock's lifetime, seconds; the process holding it renews it while it works.
LOCK_SECONDS = 30.0
#: How often the rebuild looks at the streams again while the reconcilers flush them.
POLL_SECONDS = 0.5


class InstanceGuard:
    """Checks each new connection, and rebuilds when this Redis holds older data."""

    def __init__(self, redis_url: str | None, keys: Keys) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.rebuild: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        #: Redis's maxmemory in bytes as last seen on connect (0: none, or not told).
        self.maxmemory = 0
        self.closed = False
        #: Set by the engine on a Redis Cluster: whose slot table says which shards a
        #: node serves; then each node is checked (and rebuilt) on its own.
        self.cluster: ClusterRedis | None = None
        self.node_rebuilds: dict[str, asyncio.Task[None]] = {}
        self._slots: list[int] | None = None

    @property
    def instance_key(self) -> str:
        return self.keys.instance()

    @property
    def lock_key(self) -> str:
        return self.keys.recovery_lock()

    async def check(self, execute: Callable[..., Awaitable[Any]]) -> None:
        """``PipelinedRedis.on_connect``: return to serve, raise RedisUnavailable to refuse."""
        run_id = await self._vet(execute)
        if run_id is None:
            return
        stored = await execute("GET", self.instance_key)
        if stored == run_id:
            return
        if stored is None:  # empty, flushed, or never checked
            await execute("SET", self.instance_key, run_id, "NX")
            return
        if self.rebuild is None or self.rebuild.done():  # one process wins the lock
            self.rebuild = asyncio.create_task(self._rebuild(run_id), name="redis-rebuild")
        raise RedisUnavailable(
            "Redis came back with older data (its run_id changed): users are rebuilt from "
            "PostgreSQL once the reconcilers have flushed the ledger streams")

    async def _vet(self, execute: Callable[..., Awaitable[Any]]) -> str | None:
        """The eviction policy and maxmemory checks; the node's run_id (None: not told)."""
        if self.closed:  # a late call of a closing process starts nothing
            raise RedisUnavailable("the service is shutting down")
        memory = await self._info(execute, "memory", {
            "maxmemory_policy": "a Redis that may evict keys cannot be refused",
            "maxmemory": "the backlog limit cannot be sized to Redis's memory"})
        policy = memory["maxmemory_policy"]
        if policy is not None and policy != "noeviction":
            raise RedisUnavailable(
                f"Redis may evict keys (maxmemory-policy {policy}): an evicted period counter "
                "would read as a new period; set maxmemory-policy noeviction")
        maxmemory = memory["maxmemory"]
        self.maxmemory = int(maxmemory) if maxmemory and maxmemory.isdigit() else 0
        return (await self._info(execute, "server", {
            "run_id": "a Redis that comes back older than it was cannot be detected"}))["run_id"]

    # -- Redis Cluster: the same rule per node, for the shards the node serves ------------
    async def check_node(self, execute: Callable[..., Awaitable[Any]], address: str) -> None:
        """``ClusterRedis.on_node_connect``: each shard the node serves keeps the run_id
        of the node whose data is in step with PostgreSQL (``<prefix>:{NNN}:instance``,
        in the shard's own slot, so it moves with the shard). A shard holding another
        run_id (a promoted replica, a node restarted from its file, a slot migrated from
        another node) is rebuilt; the node's other shards, and other nodes, are not."""
        run_id = await self._vet(execute)
        if run_id is None or self.cluster is None:
            return
        if self._slots is None:
            self._slots = [slot_of(self.keys.tag(s)) for s in range(self.keys.n_shards)]
        shards = self.cluster.shards_served(address, self._slots)
        keys = [self.keys.shard_instance(s) for s in shards]
        stored = await asyncio.gather(*(execute("GET", k) for k in keys))
        await asyncio.gather(*(execute("SET", k, run_id, "NX")
                               for k, v in zip(keys, stored, strict=True) if v is None))
        stale = [s for s, v in zip(shards, stored, strict=True) if v not in (None, run_id)]
        if not stale:
            return
        task = self.node_rebuilds.get(address)
        if task is None or task.done():
            self.node_rebuilds[address] = asyncio.create_task(
                self._rebuild_node(address, run_id, stale), name=f"redis-rebuild-{address}")
        raise RedisUnavailable(
            f"Redis node {address} came back with older data (its run_id changed: a "
            f"promoted replica or a restart): the users of its {len(stale)} shards are "
            "rebuilt from PostgreSQL once the reconcilers have flushed their streams")

    async def _rebuild_node(self, address: str, run_id: str, shards: list[int]) -> None:
        assert self.cluster is not None and self.redis_url is not None
        client = admin_client(self.redis_url, decode_responses=True)
        node = aioredis.Redis.from_url(self.cluster.node_url(address), decode_responses=True)
        lock = client.lock(self.keys.shard_recovery_lock(shards[0]), timeout=LOCK_SECONDS,
                           blocking=False, thread_local=False)
        try:
            if not await lock.acquire():
                return  # another process rebuilds
            instance_keys = [self.keys.shard_instance(s) for s in shards]
            held = await client.mget_nonatomic(instance_keys)  # type: ignore[attr-defined]
            shards = [s for s, v in zip(shards, held, strict=True) if v != run_id]
            if not shards:
                return  # another process finished it
            log.warning("Redis node %s (%s) holds data older than it answered: rebuilding "
                        "the users of %d shards from PostgreSQL", address, run_id, len(shards))
            await self._wait_for_flush(client, lock, [self.keys.ledger(s) for s in shards])
            deleted = await self._drop_shards(node, lock, set[int | None](shards))
            for s in shards:
                await client.set(self.keys.shard_instance(s), run_id)
            log.warning("Redis node %s rebuilt: %d user and catalog hashes of %d shards "
                        "dropped; they load from PostgreSQL on first use", address, deleted,
                        len(shards))
        except Exception:
            log.exception("rebuilding Redis node %s failed; the next connection tries again",
                          address)
        finally:
            with contextlib.suppress(Exception):  # Redis gone again: the lock expires
                if await lock.owned():
                    await lock.release()
            await client.aclose()
            await node.aclose()

    async def _drop_shards(self, node: aioredis.Redis, lock: Lock, shards: set[int | None]
                           ) -> int:
        """Delete the hashes (user states, catalog copies) of ``shards`` on one node."""
        deleted, cursor = 0, 0
        while True:
            cursor, keys = await node.scan(cursor, match=self.keys.pattern(), count=1000,
                                           _type="HASH")
            await lock.reacquire()
            mine = [k for k in keys if self.keys.shard_of_key(str(k)) in shards]
            if mine:
                pipe = node.pipeline(transaction=False)
                for key in mine:  # one slot a command
                    pipe.unlink(key)
                deleted += sum(await pipe.execute())
            if cursor == 0:
                return deleted

    async def _info(self, execute: Callable[..., Awaitable[Any]], section: str,
                    fields: dict[str, str]) -> dict[str, str | None]:
        """Fields of one INFO section, read with one command; a field Redis does not tell
        (e.g. to an ACL user without +info) is None, said once per field with what goes
        unchecked (``fields``' values): the connection serves unchecked."""
        try:
            text, reason = await execute("INFO", section), ""
        except RedisReplyError as exc:
            text, reason = "", str(exc)
        found: dict[str, str | None] = {}
        for name, unchecked in fields.items():
            match = re.search(rf"^{name}:(\S+)", text, re.M)
            found[name] = match[1] if match else None
            if match is None and name not in self._warned:
                self._warned.add(name)
                log.warning("Redis does not tell its %s (%s): %s", name,
                            reason or f"no {name} in INFO {section}", unchecked)
        return found

    async def _rebuild(self, run_id: str) -> None:
        if self.redis_url is None:
            return
        client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
        lock = client.lock(self.lock_key, timeout=LOCK_SECONDS, blocking=False,
                           thread_local=False)
        try:
            if not await lock.acquire():
                return  # another process rebuilds
            if await client.get(self.instance_key) == run_id:
                return  # another process finished it
            log.warning("Redis %s holds data older than it answered: rebuilding users from "
                        "PostgreSQL", run_id)
            await self._wait_for_flush(client, lock)
            deleted = await self._drop_state(client, lock, run_id)
            if deleted is None:
                return  # another process finished it while this one waited
            await client.set(self.instance_key, run_id)
            log.warning("Redis %s rebuilt: %d user and catalog hashes dropped; they load "
                        "from PostgreSQL on first use", run_id, deleted)
        except Exception:
            log.exception("rebuilding Redis failed; the next connection tries again")
        finally:
            with contextlib.suppress(Exception):  # Redis gone again: the lock expires
                if await lock.owned():
                    await lock.release()
            await client.aclose()

    async def _wait_for_flush(self, client: aioredis.Redis, lock: Lock,
                              streams: list[str] | None = None) -> None:
        """Until every ledger stream (of ``streams``) is empty (the reconcilers delete what
        they flushed)."""
        polls = 0
        while True:
            pipe = client.pipeline(transaction=False)
            for stream in streams if streams is not None else self.keys.all_ledgers():
                pipe.xlen(stream)
            waiting = sum(await pipe.execute())
            if waiting == 0:
                return
            if polls % 20 == 0:
                log.warning("rebuild waits for the reconcilers: %d ledger entries unflushed",
                            waiting)
            polls += 1
            await lock.reacquire()  # raises when the lock is no longer ours
            await asyncio.sleep(POLL_SECONDS)

    async def _drop_state(self, client: aioredis.Redis, lock: Lock, run_id: str
                          ) -> int | None:
        """Delete every hash of the deployment: user states and shard catalog copies.
        None when another process recorded the run_id meanwhile (nothing more is dropped)."""
        deleted, cursor = 0, 0
        while True:
            cursor, keys = await client.scan(cursor, match=self.keys.pattern(), count=1000,
                                             _type="HASH")
            await lock.reacquire()
            if await client.get(self.instance_key) == run_id:
                return None
            if keys:
                deleted += await client.unlink(*keys)
            if cursor == 0:
                return deleted

    async def close(self) -> None:
        """Stop a rebuild this process runs, and start none from now on."""
        self.closed = True
        tasks = [t for t in (self.rebuild, *self.node_rebuilds.values())
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
