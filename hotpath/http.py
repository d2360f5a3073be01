"""uvicorn's HTTP protocol, with the service's error envelope on its own 400, and one write
a response.

A request that uvicorn's parser (httptools) cannot read, such as a ``Content-Length`` that
is not a number or a malformed request line, never reaches the app: uvicorn answers it
itself and closes the connection. Its answer is plain text by default; this one carries
``{"error": {"code": "bad_request", "message", "field": null}}`` like every other error
the service gives, so a caller's error handling needs one parser.

uvicorn writes a response's head and its body with two ``transport.write`` calls, and
uvloop sends each at once: two ``write`` system calls and two TCP segments a response
(strace of a worker under load). ``CoalescingTransport`` holds what is written during one
turn of the event loop and sends it with one write at the end of that turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from hotpath.results import ErrorBody
from hotpath.schemas import ENCODER


class CoalescingTransport:
    """A transport whose writes of one event-loop turn go out as one write (in order, in
    the same turn: before the loop next waits for the network). ``close`` sends what is
    held first; ``abort`` drops it. Everything else is the wrapped transport's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(bytes(data))

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():  # a lost connection: nothing to send
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._held))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EnvelopeHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose parser-level 400 is a JSON error body, writing through a
    ``CoalescingTransport``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def send_400_response(self, msg: str) -> None:
        body = ENCODER.encode({"error": ErrorBody("bad_request", msg, None)})
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()
