"""uvicorn's HTTP protocol, with the service's error envelope on its own 400.

A request that uvicorn's parser (httptools) cannot read, such as a ``Content-Length`` that
is not a number or a malformed request line, never reaches the app: uvicorn answers it
itself and closes the connection. Its answer is plain text by default; this one carries
``{"error": {"code": "bad_request", "message", "field": null}}`` like every other error
the service gives, so a caller's error handling needs one parser.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from hotpath.results import ErrorBody
from hotpath.schemas import ENCODER


class EnvelopeHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose parser-level 400 is a JSON error body."""

    def send_400_response(self, msg: str) -> None:
        body = ENCODER.encode({"error": ErrorBody("bad_request", msg, None)})
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()
