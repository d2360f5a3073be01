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
  (503) and one process (lock ``<prefix>:{meta}:recovery``) rebuilds: it waits until the
  reconcilers have flushed every ledger stream (the surviving events reach PostgreSQL),
  deletes every user state hash and shard catalog copy (users and plans then load from
  PostgreSQL on first use: usage, credits, plans and the idempotency keys of their refs),
  and records the new run_id. Connections serve again from then on.

No reconciler running means no rebuild: the service answers 503 and says why, rather than
serve from data it cannot trust.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from lua import Keys
from lua.connection import RedisUnavailable

log = logging.getLogger("quota_gateway.instance")

#: The rebuild lock's lifetime; the process holding it renews it while it works.
LOCK_MS = 30_000
#: How often the rebuild looks at the streams again while the reconcilers flush them.
POLL_SECONDS = 0.5
_RUN_ID = re.compile(r"^run_id:(\w+)", re.M)


class InstanceGuard:
    """Checks each new connection, and rebuilds when this Redis holds older data."""

    def __init__(self, redis_url: str | None, keys: Keys) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.token = secrets.token_hex(8)
        self.rebuild: asyncio.Task[None] | None = None

    @property
    def instance_key(self) -> str:
        return f"{self.keys.prefix}:{{meta}}:instance"

    @property
    def lock_key(self) -> str:
        return f"{self.keys.prefix}:{{meta}}:recovery"

    async def check(self, execute: Callable[..., Awaitable[Any]]) -> None:
        """``PipelinedRedis.on_connect``: return to serve, raise RedisUnavailable to refuse."""
        match = _RUN_ID.search(await execute("INFO", "server"))
        if match is None:  # not a Redis we know how to ask: nothing to compare
            return
        run_id = match[1]
        stored = await execute("GET", self.instance_key)
        if stored == run_id:
            return
        if stored is None:  # empty, flushed, or never checked
            await execute("SET", self.instance_key, run_id, "NX")
            return
        if await execute("SET", self.lock_key, self.token, "NX", "PX", LOCK_MS) is not None \
                and (self.rebuild is None or self.rebuild.done()):
            self.rebuild = asyncio.create_task(self._rebuild(run_id), name="redis-rebuild")
        raise RedisUnavailable(
            "Redis came back with older data (its run_id changed): users are rebuilt from "
            "PostgreSQL once the reconcilers have flushed the ledger streams")

    async def _rebuild(self, run_id: str) -> None:
        if self.redis_url is None:
            return
        client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            if await client.get(self.instance_key) == run_id:
                return  # another process finished it
            log.warning("Redis %s holds data older than it answered: rebuilding users from "
                        "PostgreSQL", run_id)
            await self._wait_for_flush(client)
            if await client.get(self.instance_key) == run_id:
                return  # another process finished it while this one waited (its lock expired)
            deleted = await self._drop_state(client)
            await client.set(self.instance_key, run_id)
            log.warning("Redis %s rebuilt: %d user and catalog hashes dropped; they load "
                        "from PostgreSQL on first use", run_id, deleted)
        except Exception:
            log.exception("rebuilding Redis failed; the next connection tries again")
        finally:
            if await client.get(self.lock_key) == self.token:
                await client.delete(self.lock_key)
            await client.aclose()

    async def _renew(self, client: aioredis.Redis) -> None:
        if not await client.set(self.lock_key, self.token, xx=True, px=LOCK_MS):
            raise RuntimeError("the rebuild lock expired")

    async def _wait_for_flush(self, client: aioredis.Redis) -> None:
        """Until every ledger stream is empty (the reconcilers delete what they flushed)."""
        polls = 0
        while True:
            pipe = client.pipeline(transaction=False)
            for stream in self.keys.all_ledgers():
                pipe.xlen(stream)
            waiting = sum(await pipe.execute())
            if waiting == 0:
                return
            if polls % 20 == 0:
                log.warning("rebuild waits for the reconcilers: %d ledger entries unflushed",
                            waiting)
            polls += 1
            await self._renew(client)
            await asyncio.sleep(POLL_SECONDS)

    async def _drop_state(self, client: aioredis.Redis) -> int:
        """Delete every hash of the deployment: user states and shard catalog copies."""
        deleted, batch = 0, []
        async for key in client.scan_iter(match=self.keys.pattern(), count=1000,
                                          _type="HASH"):
            batch.append(key)
            if len(batch) == 1000:
                deleted += await client.unlink(*batch)
                batch = []
                await self._renew(client)
        if batch:
            deleted += await client.unlink(*batch)
        return deleted

    async def close(self) -> None:
        if self.rebuild is not None and not self.rebuild.done():
            self.rebuild.cancel()
            await asyncio.gather(self.rebuild, return_exceptions=True)
