"""The shard streams as a work queue: XREADGROUP, XACK + XDEL, XAUTOCLAIM, lag.

Group ``reconciler``, one consumer name per process. An entry is acknowledged and deleted
only after its batch committed in PostgreSQL; entries of a consumer that died are taken
over with XAUTOCLAIM once idle long enough. The streams are never trimmed by length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from lua.keys import Keys
from lua.scripts import parse_ledger_lag
from lua.source import SCRIPTS

GROUP = "reconciler"


@dataclass(slots=True)
class Entry:
    """One stream entry: where it is and what it holds (not frozen: one is made an entry
    read, see LedgerEvent)."""

    shard: int
    stream_id: str
    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Lag:
    """The unflushed part of one shard's stream."""

    shard: int
    entries: int
    oldest_ms: int  # 0 when empty


def _as_sent(response: Any, **options: Any) -> Any:
    return response


class StreamConsumer:
    """Reads, acknowledges and reclaims ledger entries for one reconciler process."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, name: str, *, per_stream_count: int,
                 block_ms: int, claim_idle_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.name = name
        self.streams = keys.all_ledgers()
        self._lag_script = redis.register_script(SCRIPTS["ledger_lag"].source)
        self._ack_script = redis.register_script(SCRIPTS["ack_many"].source)
        #: Under Redis Cluster each stream is its own slot: no command spans two streams
        #: (XREADGROUP, the lag script, MULTI/EXEC), so each goes per stream, pipelined
        #: per node by redis-py's RedisCluster.
        self.cluster = isinstance(redis, RedisCluster)
        self.per_stream_count = per_stream_count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        if not self.cluster:
            # XREADGROUP's reply as Redis sent it: redis-py would build a dict of every
            # entry's fields first (_entries reads the list itself).
            redis.set_response_callback("XREADGROUP", _as_sent)

    async def ensure_groups(self) -> None:
        """Create the group on every shard stream (from the start: id 0), once."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                raise result

    def _entries(self, reply: Any) -> list[Entry]:
        """An XREADGROUP or XAUTOCLAIM reply: {stream: [(id, fields), ...]} (RESP3) or
        [[stream, [(id, fields), ...]], ...] (RESP2); fields a dict (redis-py's parsing) or,
        as sent, a list [name, value, ...]."""
        out = []
        for stream, items in (reply.items() if isinstance(reply, dict) else reply):
            shard = self.keys_shard(stream)
            for stream_id, fields in items:
                if not fields:  # a deleted entry comes back without fields
                    continue
                if isinstance(fields, list):  # as sent: [name, value, ...]
                    fields = ({fields[0]: fields[1]} if len(fields) == 2
                              else dict(zip(fields[::2], fields[1::2], strict=False)))
                out.append(Entry(shard, stream_id, fields))
        return out

    def keys_shard(self, stream: str) -> int:
        """The shard number of a stream key."""
        tag = stream[stream.index("{") + 1 : stream.index("}")]
        return int(tag)

    async def read(self) -> list[Entry]:
        """New entries across every shard, waiting up to BLOCK ms when there are none."""
        if self.cluster:
            return await self._read_each()
        try:
            reply = await self.redis.xreadgroup(
                GROUP, self.name, dict.fromkeys(self.streams, ">"),
                count=self.per_stream_count, block=self.block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_groups()  # Redis lost its data: the groups start again
            return []
        return self._entries(reply or [])

    async def _read_each(self) -> list[Entry]:
        """Under Redis Cluster: one XREADGROUP a stream (no BLOCK: a blocked call would
        hold its node's connection), all in one pipeline; BLOCK ms of sleep when none had
        anything."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xreadgroup(GROUP, self.name, {stream: ">"}, count=self.per_stream_count)
        out: list[Entry] = []
        missing = False
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception):
                if "NOGROUP" not in str(result):
                    raise result
                missing = True
            elif result:
                out += self._entries(result)
        if missing:  # a node lost its data (or a shard moved there empty): groups again
            await self.ensure_groups()
        if not out:
            await asyncio.sleep(self.block_ms / 1000)
        return out

    async def claim(self) -> list[Entry]:
        """Take over entries other consumers left pending longer than the claim idle time."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xautoclaim(stream, GROUP, self.name, self.claim_idle_ms, "0-0",
                            count=self.per_stream_count)
        out: list[Entry] = []
        stale: list[tuple[str, str]] = []
        for stream, result in zip(self.streams, await pipe.execute(raise_on_error=False),
                                  strict=True):
            if isinstance(result, Exception):
                if "NOGROUP" in str(result):
                    continue
                raise result
            shard = self.keys_shard(stream)
            for stream_id, fields in result[1]:
                if fields:
                    out.append(Entry(shard, stream_id, fields))
                else:
                    stale.append((stream, stream_id))
            stale += [(stream, sid) for sid in (result[2] if len(result) > 2 else [])]
        if stale:  # entries deleted after their flush but never acknowledged
            pipe = self.redis.pipeline(transaction=False)
            for stream, stream_id in stale:
                pipe.xack(stream, GROUP, stream_id)
            await pipe.execute()
        return out

    async def done(self, entries: Sequence[Entry]) -> None:
        """Acknowledge and delete entries whose batch committed.

        In one MULTI/EXEC: a snapshot, an AOF cut or a replica never holds an entry acked
        but not deleted, which no reader would ever take again (XREADGROUP > skips it, and
        it is not pending), so its stream would never be empty."""
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(self.keys.ledger(entry.shard), []).append(entry.stream_id)
        if self.cluster:  # a transaction may not span slots: one per stream
            await asyncio.gather(*(self._ack_delete({s: ids}) for s, ids in by_stream.items()))
        else:
            await self._ack_delete(by_stream)

    async def _ack_delete(self, by_stream: dict[str, list[str]]) -> None:
        """XACK and XDEL of every stream in one ack_many.lua call (a MULTI/EXEC pipeline of
        two commands a stream cost the reconciler more CPU than the entries' decoding)."""
        args: list[str | int] = [GROUP]
        for ids in by_stream.values():
            args.append(len(ids))
            args += ids
        await self._ack_script(keys=list(by_stream), args=args)

    async def lag(self) -> list[Lag]:
        """Unflushed entries and the age of the oldest, per shard: one ledger_lag.lua call
        for every stream (a pipeline of two commands a shard cost the reconciler more CPU
        than its flushes)."""
        if self.cluster:
            lags = await self._lag_each()
        else:
            lags = parse_ledger_lag(await self._lag_script(keys=self.streams))
        return [Lag(shard, entries, oldest_ms) for shard, (entries, oldest_ms) in enumerate(lags)]

    async def _lag_each(self) -> list[tuple[int, int]]:
        """Under Redis Cluster: the lag script once a stream, in one pipeline (the script
        loaded on every primary first when a node does not have it)."""
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for stream in self.streams:
                pipe.evalsha(self._lag_script.sha, 1, stream)
            replies = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            await self.redis.script_load(self._lag_script.script)  # every primary
        lags: list[tuple[int, int]] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            lags += parse_ledger_lag(reply)
        return lags


def lag_seconds(lags: Sequence[Lag], now_ms: int | None = None) -> float:
    """Age of the oldest unflushed entry across shards, in seconds (0 when none)."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    oldest = [lag.oldest_ms for lag in lags if lag.oldest_ms]
    return max(0.0, (now - min(oldest)) / 1000) if oldest else 0.0
