"""A pipelined Redis connection for the hot path.

Every request of a worker shares one connection: commands issued in the same event-loop
tick are written in one syscall, replies are parsed by hiredis and matched to their
callers in order (RESP answers in order). This removes the per-call pool checkout, lock
and parser set-up of a general client, which is where a straightforward redis-py hot path
spends most of its time (see docs/architecture.md and docs/benchmarks.md).

Batches: ``run_batched`` queues one item of a batch script (``debit_many.lua``); at the
flush, the items queued on a connection with the same script and header (the arguments
they share) go out as one EVALSHA of at most ``BATCH_MAX`` items, and each caller gets its
own item's reply (or error). Redis then parses one command, sets up one script call and
reads the clock once for the whole batch. While a batch call is unanswered, new items are
held and go out together when its reply comes: an idle connection sends at once, a busy
one sends fewer and larger calls (a full batch goes out at once either way).

WAIT (``WaitPolicy``, REDIS_WAIT_*): a write-through script (``run_script(...,
wait=True)``) is followed on the same connection, in the same write, by ``WAIT n timeout``;
with ``debits`` on, every batch call is too (one WAIT after the batches of one flush). ``n``
is the smaller of REDIS_WAIT_REPLICAS and the most replicas this process has seen connected
to the node (``INFO replication`` on each new connection), so a Redis without replicas is
never waited on. Fewer acknowledgements than asked are logged and counted
(``quota_redis_wait_short_total``); the call's own reply is answered as it is.

Failure model: a timeout of the oldest outstanding call, or a lost connection, fails every
outstanding call (every item of an outstanding batch) with ``RedisUnavailable`` (the
request answers 503) and the next call reconnects. A call that timed out may still have
run in Redis: debits are idempotent on their ref, so the caller's retry learns the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from core import metrics
from core.errors import DependencyUnavailable
from lua.resp import BATCH_MAX, Batch, RedisReplyError, settle
from lua.source import Script

log = logging.getLogger("quota_gateway.redis")
#: The batch scripts that write, followed by WAIT with REDIS_WAIT_DEBITS (not reads).
WAITED_BATCHES = frozenset({"debit_many"})


@dataclass(frozen=True, slots=True)
class WaitPolicy:
    """WAIT for replicas after writes: how many (at most), how long, and after debits too."""

    replicas: int
    timeout_ms: int
    debits: bool = False


def _consume(future: asyncio.Future[Any]) -> None:
    """A WAIT reply nobody awaits (its call failed): retrieve its error, if any."""
    if not future.cancelled():
        future.exception()


class RedisUnavailable(DependencyUnavailable):
    """Redis could not be reached, or did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__("redis", message)


def _parse_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    db = 0
    if parts.scheme == "unix":
        from urllib.parse import parse_qs

        db = int(parse_qs(parts.query).get("db", ["0"])[0])
    elif parts.path.strip("/"):
        db = int(parts.path.strip("/"))
    return {
        "unix": parts.path if parts.scheme == "unix" else None,
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "tls": parts.scheme == "rediss",
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "db": db,
    }


class _Pipe(asyncio.Protocol):
    """One TCP connection: writes coalesced per loop tick, replies matched in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self.pending: deque[tuple[asyncio.Future[Any] | Batch, float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        # Batch items queued since the last flush (held while a batch call is unanswered),
        # by (script, header, hash slot: 0 off a cluster); packed at the flush.
        self.batches: dict[tuple[str, tuple[str | int, ...], int], tuple[Batch, float]] = {}
        self.batches_pending = 0  # batch calls written (or about to be) and not answered
        self.flush_scheduled = False
        self.closed = False
        #: ``WAIT n timeout`` packed, and how long its reply may take, s (PipelinedRedis
        #: sets them); ``wait_batches``: sent after batch calls too (REDIS_WAIT_DEBITS).
        self.wait_packed: bytes | None = None
        self.wait_seconds = 0.0
        self.wait_batches = False

    # asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # the byte stream is corrupt: start afresh
                self.abort(f"Redis protocol error: {exc}")
                return
            if reply is False:
                return
            if not pending:  # a reply nobody waits for: the stream is out of step
                self.abort("unexpected reply from Redis")
                return
            future, deadline = pending.popleft()
            if isinstance(future, Batch):
                self.batches_pending -= 1
                if isinstance(reply, hiredis.ReplyError) and not future.evaled \
                        and str(reply).startswith("NOSCRIPT"):
                    future.evaled = True  # the script cache was emptied: send the source
                    self._queue(future.pack(), future, deadline)
                    if future.wait is not None:  # the first WAIT ran before this call
                        future.wait = self.queue_wait()
                else:
                    future.resolve(reply)
                if not self.batches_pending and self.batches:
                    self._schedule_flush()  # the items held while this call ran go now
                continue
            settle(future, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fail_all(f"connection to Redis lost: {exc or 'closed'}")

    # sending ---------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def _queue(self, packed: bytes, waiter: asyncio.Future[Any] | Batch,
               deadline: float) -> None:
        self.pending.append((waiter, deadline))
        if isinstance(waiter, Batch):
            self.batches_pending += 1
        self.out.append(packed)
        self._schedule_flush()

    def send(self, packed: bytes, deadline: float) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self._queue(packed, future, deadline)
        return future

    def queue_wait(self, *, schedule: bool = True) -> asyncio.Future[Any]:
        """``WAIT`` right after what is queued on this connection (``wait_packed``)."""
        assert self.wait_packed is not None
        future: asyncio.Future[Any] = self.loop.create_future()
        future.add_done_callback(_consume)
        self.pending.append((future, time.monotonic() + self.wait_seconds))
        self.out.append(self.wait_packed)
        if schedule:
            self._schedule_flush()
        return future

    def send_item(self, script: Script, header: tuple[str | int, ...], keys: Sequence[str],
                  args: Sequence[str | int | bytes], deadline: float, slot: int = 0
                  ) -> tuple[asyncio.Future[Any], Batch]:
        """Queue one item of a batch script call; it goes out at this tick's flush. Items
        of different hash ``slot``s never share a call (Redis Cluster refuses CROSSSLOT)."""
        future: asyncio.Future[Any] = self.loop.create_future()
        group = (script.sha, header, slot)
        entry = self.batches.get(group)
        if entry is None or len(entry[0].futures) >= BATCH_MAX:
            if entry is not None:  # full: it takes its place in the stream now
                self._queue(entry[0].pack(), entry[0], entry[1])
                if self.wait_batches and script.name in WAITED_BATCHES:
                    entry[0].wait = self.queue_wait()
            entry = self.batches[group] = (Batch(script, header), deadline)
            if not self.batches_pending:
                self._schedule_flush()
        batch = entry[0]
        batch.item_keys.extend(keys)
        batch.item_args.extend(args)
        batch.futures.append(future)
        return future, batch

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is None or self.closed:
            return
        if self.batches and not self.batches_pending:
            batches, self.batches = self.batches, {}
            for batch, deadline in batches.values():
                self.pending.append((batch, deadline))
                self.out.append(batch.pack())
            self.batches_pending += len(batches)
            writes = [b for b, _ in batches.values() if b.script.name in WAITED_BATCHES]
            if self.wait_batches and writes:  # one WAIT covers every batch of this write
                waited = self.queue_wait(schedule=False)  # the write below carries it
                for batch in writes:
                    batch.wait = waited
        out, self.out = self.out, []
        if out:
            self.transport.write(b"".join(out))

    # failure ---------------------------------------------------------------------------
    def fail_all(self, message: str) -> None:
        pending, self.pending = self.pending, deque()
        batches, self.batches = self.batches, {}
        self.batches_pending = 0
        self.out = []
        exc = RedisUnavailable(message)
        for waiter, _ in pending:
            if isinstance(waiter, Batch):
                waiter.fail(exc)
            elif not waiter.done():
                waiter.set_exception(exc)
        for batch, _ in batches.values():
            batch.fail(exc)

    def abort(self, message: str) -> None:
        self.closed = True
        self.fail_all(message)
        if self.transport is not None:
            self.transport.abort()

    def overdue(self, now: float) -> bool:
        return bool(self.pending) and self.pending[0][1] < now


class PipelinedRedis:
    """The hot path's Redis client: a few pipelined connections, round-robin."""

    cluster = False  # lua/cluster.py's ClusterRedis routes by slot over many of these

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        connections: int = 1,
        wait: WaitPolicy | None = None,
    ) -> None:
        assert connections >= 1 and timeout_seconds > 0
        self.options = _parse_url(url)
        opts = self.options
        self.address = opts["unix"] or f"{opts['host']}:{opts['port']}"
        self.wait = wait if wait is not None and wait.replicas > 0 else None
        #: The most replicas seen connected to this Redis (INFO replication, per connection).
        self.replicas_seen = 0
        self._short_logged = 0.0
        self.timeout = timeout_seconds
        self.connect_timeout = connect_timeout_seconds
        self._pipes: list[_Pipe | None] = [None] * connections
        self._locks = [asyncio.Lock() for _ in range(connections)]
        self._next = 0
        self._watchdog: asyncio.Task[None] | None = None
        #: Run on every new connection before it serves a call, with a function that sends
        #: one command on it; raising (RedisUnavailable) refuses the connection. The engine
        #: checks here that this Redis still holds data it has vouched for (quota.py).
        self.on_connect: Callable[[Callable[..., Awaitable[Any]]], Awaitable[None]] | None = None

    async def _connect(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        opts = self.options
        try:
            async with asyncio.timeout(self.connect_timeout):
                if opts["unix"]:
                    _, pipe = await loop.create_unix_connection(lambda: _Pipe(loop), opts["unix"])
                else:
                    context = ssl.create_default_context() if opts["tls"] else None
                    _, pipe = await loop.create_connection(
                        lambda: _Pipe(loop), opts["host"], opts["port"], ssl=context
                    )
                handshake = []
                if opts["password"]:
                    auth = [opts["username"], opts["password"]] if opts["username"] else [
                        opts["password"]
                    ]
                    handshake.append(("AUTH", *auth))
                if opts["db"]:
                    handshake.append(("SELECT", opts["db"]))
                deadline = time.monotonic() + self.connect_timeout

                async def execute(*args: str | int) -> Any:
                    command: Any = args
                    return await pipe.send(hiredis.pack_command(command), deadline)

                try:  # a connection refused anywhere in its handshake is closed here
                    for command in handshake:
                        await execute(*command)
                    if self.wait is not None:
                        self._learn_replicas(await execute("INFO", "replication"))
                    if self.on_connect is not None:
                        await self.on_connect(execute)
                except BaseException:
                    pipe.abort("refused during the connection's handshake")
                    raise
        except (OSError, TimeoutError, RedisReplyError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis: {exc!r}") from None
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="redis-watchdog")
        self._arm(pipe)
        return pipe

    # -- WAIT ------------------------------------------------------------------------------
    def _learn_replicas(self, info: Any) -> None:
        for line in str(info).splitlines():
            if line.startswith("connected_slaves:"):
                seen = int(line.partition(":")[2])
                if seen > self.replicas_seen:
                    self.replicas_seen = seen
                    for pipe in self._pipes:  # the other connections ask for as many
                        if pipe is not None:
                            self._arm(pipe)

    def wanted(self) -> int:
        """Replicas a WAIT asks for: REDIS_WAIT_REPLICAS, at most as many as seen."""
        return min(self.wait.replicas, self.replicas_seen) if self.wait is not None else 0

    def _arm(self, pipe: _Pipe) -> None:
        wanted = self.wanted()
        if self.wait is None or not wanted:
            pipe.wait_packed, pipe.wait_batches = None, False
            return
        command: Any = ("WAIT", wanted, self.wait.timeout_ms)
        pipe.wait_packed = hiredis.pack_command(command)
        pipe.wait_seconds = self.timeout + self.wait.timeout_ms / 1000
        pipe.wait_batches = self.wait.debits

    async def _acked(self, op: str, waited: asyncio.Future[Any]) -> None:
        """Count one write's WAIT; fewer acknowledgements than asked: logged and counted."""
        wanted = self.wanted()
        metrics.REDIS_WAITS.labels(op).inc()
        try:
            acked = int(await waited)
        except (RedisUnavailable, RedisReplyError) as exc:
            acked, why = -1, f"WAIT failed: {exc}"
        else:
            why = f"{acked} of {wanted} replicas acknowledged within {self.wait_timeout_ms} ms"
        if acked >= wanted:
            return
        metrics.REDIS_WAIT_SHORT.labels(op).inc()
        now = time.monotonic()
        if now - self._short_logged >= 1.0:  # at most one line a second per node
            self._short_logged = now
            log.warning("Redis %s: %s after %s (the write stands; counted in "
                        "quota_redis_wait_short_total)", self.address, why, op)

    @property
    def wait_timeout_ms(self) -> int:
        return self.wait.timeout_ms if self.wait is not None else 0

    async def _pipe(self) -> _Pipe:
        index = self._next
        self._next = (index + 1) % len(self._pipes)
        pipe = self._pipes[index]
        if pipe is not None and not pipe.closed:
            return pipe
        async with self._locks[index]:
            pipe = self._pipes[index]
            if pipe is None or pipe.closed:
                pipe = self._pipes[index] = await self._connect()
            return pipe

    async def _watch(self) -> None:
        """Abort a connection whose oldest call is overdue: Redis is stuck or gone."""
        interval = min(0.05, self.timeout / 4)
        while any(p is not None and not p.closed for p in self._pipes):
            await asyncio.sleep(interval)
            now = time.monotonic()
            for pipe in self._pipes:
                if pipe is not None and not pipe.closed and pipe.overdue(now):
                    pipe.abort(f"Redis did not answer within {self.timeout}s")

    async def execute(self, *args: str | int | bytes) -> Any:
        """Send one command and return its reply; error replies raise RedisReplyError."""
        pipe = self._pipes[self._next]
        if pipe is None or pipe.closed:
            pipe = await self._pipe()
        else:
            self._next = (self._next + 1) % len(self._pipes)
        packed = hiredis.pack_command(args)  # type: ignore[arg-type]
        return await pipe.send(packed, time.monotonic() + self.timeout)

    async def execute_asking(self, *args: str | int | bytes, wait_op: str = "") -> Any:
        """ASKING then the command, on one connection (Redis Cluster's ASK redirection:
        the slot is being imported by this node); with ``wait_op``, WAIT after it."""
        pipe = await self._pipe()
        deadline = time.monotonic() + self.timeout
        asking = pipe.send(hiredis.pack_command(("ASKING",)), deadline)
        reply = pipe.send(hiredis.pack_command(args), deadline)  # type: ignore[arg-type]
        waited = pipe.queue_wait() if wait_op and pipe.wait_packed else None
        await asking
        result = await reply
        if waited is not None:
            await self._acked(wait_op, waited)
        return result

    async def run_batched(
        self, script: Script, header: tuple[str | int, ...], keys: Sequence[str],
        args: Sequence[str | int | bytes], slot: int = 0,
    ) -> Any:
        """One item of a batch script call (see ``Batch``): its own reply, or its error.

        Items queued in the same tick with the same script, ``header`` and ``slot`` share
        one call.
        """
        pipe = self._pipes[self._next]
        if pipe is None or pipe.closed:
            pipe = await self._pipe()
        else:
            self._next = (self._next + 1) % len(self._pipes)
        future, batch = pipe.send_item(script, header, keys, args,
                                       time.monotonic() + self.timeout, slot)
        reply = await future
        if batch.wait is not None:  # REDIS_WAIT_DEBITS: the WAIT sent after the call
            await self._acked(script.name, batch.wait)
        return reply

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int | bytes], *,
        wait: bool = False,
    ) -> Any:
        """EVALSHA, falling back to EVAL once when the script cache was emptied; with
        ``wait``, each followed on its connection by WAIT (the WaitPolicy's)."""
        if wait and self.wait is not None:
            pipe = await self._pipe()
            if pipe.wait_packed is not None:
                return await self._run_waited(pipe, script, keys, args)
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def _run_waited(self, pipe: _Pipe, script: Script, keys: Sequence[str],
                          args: Sequence[str | int | bytes]) -> Any:
        """The script and WAIT back to back on one connection (EVAL after NOSCRIPT)."""
        for evaled in (False, True):
            command: Any = ("EVAL", script.source) if evaled else ("EVALSHA", script.sha)
            packed = hiredis.pack_command((*command, len(keys), *keys, *args))
            reply = pipe.send(packed, time.monotonic() + self.timeout)
            waited = pipe.queue_wait()
            try:
                result = await reply
            except RedisReplyError as exc:
                if evaled or not str(exc).startswith("NOSCRIPT"):
                    raise
                continue
            await self._acked(script.name, waited)
            return result
        raise AssertionError("unreachable")

    def slot_groups(self, keys: Sequence[str]) -> list[list[str]]:
        """``keys`` as the groups one script call may take: all of them on one Redis."""
        return [list(keys)]

    async def close(self) -> None:
        """Close every connection and stop the watchdog."""
        for pipe in self._pipes:
            if pipe is not None and pipe.transport is not None:
                pipe.closed = True
                pipe.transport.close()
        self._pipes = [None] * len(self._pipes)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
