"""RESP on the hot path: commands packed by hiredis, and batches of script items (one
EVALSHA carrying the items that share a script and a header), each caller handed its own
item's reply."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis

from lua.source import Script


class RedisReplyError(Exception):
    """Redis answered a command with an error (a bug or a misconfiguration, not the caller's)."""


#: The most items one batch script call carries.
BATCH_MAX = 32
#: Packed batch headers, by header. A header holds a day's windows and the deployment's
#: constants ("now" is 0 in production: Redis TIME), so it is packed about once a day
#: instead of once per call (hiredis turns ints into text slowly; packing it saves about
#: 15k instructions per call of one item, bench/instructions.py).
_PACKED_HEADERS: dict[tuple[str | int, ...], bytes] = {}
_PACKED_HEADERS_MAX = 16  # tests pin "now", and then every call has its own header


def bulk(values: Sequence[str | int | bytes]) -> bytes:
    """``values`` as RESP bulk strings, without the array line ``*<n>``."""
    command: Any = tuple(values)  # hiredis' stub types a 1-tuple
    packed: bytes = hiredis.pack_command(command)
    return packed[packed.index(b"\n") + 1:]


def _packed_header(header: tuple[str | int, ...]) -> bytes:
    packed = _PACKED_HEADERS.get(header)
    if packed is None:
        if len(_PACKED_HEADERS) >= _PACKED_HEADERS_MAX:
            _PACKED_HEADERS.clear()
        packed = _PACKED_HEADERS[header] = bulk(header)
    return packed


def settle(future: asyncio.Future[Any], reply: Any) -> None:
    """Hand a caller its reply; an error reply raises RedisReplyError in the caller."""
    if future.done():  # the caller went away (cancelled); the reply is dropped
        return
    if isinstance(reply, hiredis.ReplyError):
        future.set_exception(RedisReplyError(str(reply)))
    else:
        future.set_result(reply)


class Batch:
    """Items of one batch script call: keys and arguments per item, shared header args."""

    __slots__ = ("evaled", "futures", "header", "item_args", "item_keys", "script", "wait")

    def __init__(self, script: Script, header: tuple[str | int, ...]) -> None:
        self.script = script
        self.header = header
        self.item_keys: list[str] = []
        self.item_args: list[str | int | bytes] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.evaled = False  # sent again by EVAL after NOSCRIPT
        #: The reply of the WAIT sent right after this call (REDIS_WAIT_DEBITS), if any.
        self.wait: asyncio.Future[Any] | None = None

    def pack(self) -> bytes:
        """EVALSHA (EVAL once the script cache answered NOSCRIPT) of every item."""
        keys, args = self.item_keys, self.item_args
        if self.evaled:
            command: Any = ("EVAL", self.script.source, len(keys), *keys, *self.header, *args)
            packed: bytes = hiredis.pack_command(command)
            return packed
        n_keys = b"%d" % len(keys)
        return b"".join((
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$%d\r\n%s\r\n" % (
                3 + len(keys) + len(self.header) + len(args), self.script.sha.encode(),
                len(n_keys), n_keys),
            bulk(keys), _packed_header(self.header), bulk(args)))

    def resolve(self, reply: Any) -> None:
        """Hand each caller its item's reply; a whole-call error goes to every item.

        A batch script answers one flat array: per item the number of its values, then
        the values (or 1 and an error reply)."""
        futures = self.futures
        items: list[Any] = []
        if isinstance(reply, list):
            at, end = 0, len(reply)
            while at < end and len(items) < len(futures):
                size = reply[at]
                if not isinstance(size, int) or not 0 < size <= end - at - 1:
                    break
                items.append(reply[at + 1] if size == 1 and isinstance(
                    reply[at + 1], hiredis.ReplyError) else reply[at + 1:at + 1 + size])
                at += 1 + size
            if at != end:
                items = []
        if len(items) != len(futures):
            message = str(reply) if isinstance(reply, hiredis.ReplyError) else \
                f"{self.script.name}: {len(futures)} items, unexpected reply {reply!r:.200}"
            self.fail(RedisReplyError(message))
            return
        for future, item in zip(futures, items, strict=True):
            settle(future, item)

    def fail(self, exc: Exception) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(exc)
