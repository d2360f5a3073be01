"""HTTP transports: a pool of keep-alive connections, timeouts, and nothing else.

A transport sends one request and answers ``(status, body, Retry-After header)``, or raises
``TransportFailure`` when the exchange failed (refused, reset, dropped, timed out); retries,
errors and decoding are the client's. The defaults, ``Urllib3Transport`` (sync) and
``AiohttpTransport`` (async), were chosen by measurement (README, "Transport"); anything
with the same constructor and methods can replace them (``transport=`` of the clients), for
instance to go through a test double.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Mapping

#: (status, body, the Retry-After header or None)
Answer = tuple[int, bytes, "str | None"]


class TransportFailure(Exception):
    """The exchange failed before an answer was read: the request may or may not have
    reached the service."""


class SyncTransport(Protocol):
    """What ``Client`` needs of a transport."""

    def request(self, method: str, path: str, body: bytes | None) -> Answer:
        """Send ``method path`` (the path under the base URL) with ``body``."""
        ...

    def close(self) -> None:
        """Close every connection."""
        ...


class AsyncTransport(Protocol):
    """What ``AsyncClient`` needs of a transport."""

    async def request(self, method: str, path: str, body: bytes | None) -> Answer:
        """Send ``method path`` (the path under the base URL) with ``body``."""
        ...

    async def aclose(self) -> None:
        """Close every connection."""
        ...


class Urllib3Transport:
    """The sync transport: one urllib3 connection pool (thread-safe; ``max_connections``
    kept open for reuse; more are opened when more threads call at once, and closed after)."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str], timeout: float,
                 connect_timeout: float, max_connections: int, keepalive_s: float) -> None:
        import urllib3
        from urllib3.connectionpool import connection_from_url

        self._errors = (urllib3.exceptions.HTTPError, OSError)
        self._prefix = urlsplit(base_url).path.rstrip("/")
        # urllib3 checks an idle connection for a close by the server before it reuses it;
        # keepalive_s has no counterpart here.
        self._pool = connection_from_url(
            base_url, maxsize=max_connections, block=False, headers=dict(headers),
            timeout=urllib3.Timeout(connect=connect_timeout, read=timeout), retries=False)

    def request(self, method: str, path: str, body: bytes | None) -> Answer:
        try:
            response = self._pool.urlopen(method, self._prefix + path, body=body,
                                          retries=False, redirect=False,
                                          assert_same_host=False, preload_content=True)
        except self._errors as exc:
            raise TransportFailure(f"{type(exc).__name__}: {exc}") from exc
        return response.status, response.data, response.headers.get("Retry-After")

    def close(self) -> None:
        self._pool.close()


class AiohttpTransport:
    """The async transport: one aiohttp session whose connector keeps up to
    ``max_connections`` connections (size it to the calls in flight at once: a call waits
    for a free connection beyond that). Idle connections are closed after ``keepalive_s``,
    before the service's own keep-alive timeout (uvicorn's 5 s) closes them under a
    request. The session is made on first use, in the running loop."""

    def __init__(self, base_url: str, *, headers: Mapping[str, str], timeout: float,
                 connect_timeout: float, max_connections: int, keepalive_s: float) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self._errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
        self._base = base_url.rstrip("/")
        self._headers = dict(headers)
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._session: Any = None
        self._urls: dict[str, Any] = {}

    def _open(self) -> Any:
        aiohttp = self._aiohttp
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                         keepalive_timeout=self._keepalive_s,
                                         ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=self._timeout,
            auto_decompress=False, raise_for_status=False, skip_auto_headers=("User-Agent",))
        return self._session

    def _url(self, path: str) -> Any:
        url = self._urls.get(path)
        if url is None:
            from yarl import URL

            if len(self._urls) >= 256:  # paths with a user id or a query vary
                self._urls.clear()
            url = self._urls[path] = URL(self._base + path, encoded=True)
        return url

    async def request(self, method: str, path: str, body: bytes | None) -> Answer:
        session = self._session or self._open()
        try:
            async with session.request(method, self._url(path), data=body) as response:
                data = await response.read()
                return response.status, data, response.headers.get("Retry-After")
        except self._errors as exc:
            raise TransportFailure(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
