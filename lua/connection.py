"""A pipelined Redis connection for the hot path.

Every request of a worker shares one connection: commands issued in the same event-loop
tick are written in one syscall, replies are parsed by hiredis and matched to their
callers in order (RESP answers in order). This removes the per-call pool checkout, lock
and parser set-up of a general client, which is where a straightforward redis-py hot path
spends most of its time (see docs/architecture.md and docs/benchmarks.md).

Failure model: a timeout of the oldest outstanding call, or a lost connection, fails every
outstanding call with ``RedisUnavailable`` (the request answers 503) and the next call
reconnects. A call that timed out may still have run in Redis: debits are idempotent on
their ref, so the caller's retry learns the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from hotpath.errors import DependencyUnavailable
from lua import Script


class RedisUnavailable(DependencyUnavailable):
    """Redis could not be reached, or did not answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__("redis", message)


class RedisReplyError(Exception):
    """Redis answered a command with an error (a bug or a misconfiguration, not the caller's)."""


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
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closed = False

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
            future, _ = pending.popleft()
            if future.done():  # the caller went away (cancelled); the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fail_all(f"connection to Redis lost: {exc or 'closed'}")

    # sending ---------------------------------------------------------------------------
    def send(self, packed: bytes, deadline: float) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((future, deadline))
        self.out.append(packed)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is None or self.closed:
            return
        out, self.out = self.out, []
        self.transport.write(b"".join(out))

    # failure ---------------------------------------------------------------------------
    def fail_all(self, message: str) -> None:
        pending, self.pending = self.pending, deque()
        self.out = []
        for future, _ in pending:
            if not future.done():
                future.set_exception(RedisUnavailable(message))

    def abort(self, message: str) -> None:
        self.closed = True
        self.fail_all(message)
        if self.transport is not None:
            self.transport.abort()

    def overdue(self, now: float) -> bool:
        return bool(self.pending) and self.pending[0][1] < now


class PipelinedRedis:
    """The hot path's Redis client: a few pipelined connections, round-robin."""

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float,
        connect_timeout_seconds: float,
        connections: int = 1,
    ) -> None:
        assert connections >= 1 and timeout_seconds > 0
        self.options = _parse_url(url)
        self.timeout = timeout_seconds
        self.connect_timeout = connect_timeout_seconds
        self._pipes: list[_Pipe | None] = [None] * connections
        self._locks = [asyncio.Lock() for _ in range(connections)]
        self._next = 0
        self._watchdog: asyncio.Task[None] | None = None

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
                for command in handshake:
                    await pipe.send(hiredis.pack_command(command), deadline)
        except (OSError, TimeoutError, RedisReplyError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis: {exc!r}") from None
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch(), name="redis-watchdog")
        return pipe

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

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """EVALSHA, falling back to EVAL once when the script cache was emptied."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script.source, len(keys), *keys, *args)

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
