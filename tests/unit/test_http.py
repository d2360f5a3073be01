"""CoalescingTransport: the writes of one event-loop turn leave as one write, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from hotpath.http import CoalescingTransport


class Recording:
    """A transport that records its calls."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.calls.append(("write", data))

    def close(self) -> None:
        self.closing = True
        self.calls.append("close")

    def abort(self) -> None:
        self.closing = True
        self.calls.append("abort")

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


async def turn() -> None:
    """Let the loop run the callbacks scheduled so far."""
    await asyncio.sleep(0)


async def test_the_writes_of_one_turn_go_out_as_one_in_order() -> None:
    raw = Recording()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(bytearray(b"{}"))
    assert raw.calls == []  # held until the end of the turn
    assert transport.get_write_buffer_size() == 7 + 21
    await turn()
    assert raw.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\n{}")]
    transport.write(b"next")  # a later turn: its own write
    await turn()
    assert raw.calls[1:] == [("write", b"next")]
    await turn()
    assert len(raw.calls) == 2  # nothing held, nothing sent again


async def test_close_sends_what_is_held_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    raw = Recording()
    transport = CoalescingTransport(raw, loop)  # type: ignore[arg-type]
    transport.write(b"head")
    transport.write(b"body")
    transport.close()
    assert raw.calls == [("write", b"headbody"), "close"]
    await turn()  # the scheduled flush finds nothing left
    assert raw.calls == [("write", b"headbody"), "close"]

    aborted = Recording()
    transport = CoalescingTransport(aborted, loop)  # type: ignore[arg-type]
    transport.write(b"lost")
    transport.abort()
    await turn()
    assert aborted.calls == ["abort"]


async def test_nothing_is_written_to_a_transport_closed_meanwhile() -> None:
    raw = Recording()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"late")
    raw.closing = True  # the peer went away before the turn ended
    await turn()
    assert raw.calls == []
    assert transport.get_extra_info("peername") == "info:peername"  # the rest delegates
    assert transport.is_closing() is True
