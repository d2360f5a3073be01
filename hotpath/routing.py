"""What every route shares: its declaration, authentication, error mapping, timing, and
reading the body within its limit."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response

from core import metrics
from core.errors import (
    BacklogFull,
    DependencyUnavailable,
    InvalidInput,
    PayloadTooLarge,
    QuotaError,
    UnsupportedMediaType,
)
from core.settings import Caller
from hotpath.auth import Authenticator
from hotpath.responses import JSON, error_response

log = logging.getLogger("quota_gateway")
Handler = Callable[[Request, Caller | None], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Param:
    """A path, query or header parameter of a route, as the spec shows it: ``kind`` is a
    type msgspec describes (with its Meta constraints); the handler reads the value."""

    name: str
    location: Literal["path", "query", "header"]
    kind: Any
    required: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: what it is, who may call it, what it takes and returns.

    ``errors`` are the statuses its handler answers besides 200, each with the ErrorOut
    envelope unless ``error_bodies`` names a model that carries more (a 409's original
    tx_id); the spec adds what the HTTP layer answers on every route (400, 405, and 404
    where a path parameter misses the route). ``result`` is a model, or a type or schema
    of a plain answer in ``media_type``."""

    method: str
    path: str
    name: str
    summary: str
    scope: str | None
    handler: Handler
    body: type | None = None
    result: Any = None
    errors: tuple[int, ...] = ()
    params: tuple[Param, ...] = ()
    error_bodies: tuple[tuple[int, type], ...] = ()
    media_type: str = JSON


class Endpoints:
    """Turns operations into Starlette endpoints: authenticate, run, map errors, time."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth
        self._timers: dict[tuple[str, int], Any] = {}

    def _observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status // 100)
        timer = self._timers.get(key)
        if timer is None:
            timer = self._timers[key] = metrics.REQUEST_SECONDS.labels(route, f"{key[1]}xx")
        timer.observe(seconds)

    def endpoint(self, op: Operation) -> Callable[[Request], Awaitable[Response]]:
        """The same for every route; errors become their envelope here, in one place."""
        authenticate, require, handler = self.auth.authenticate, self.auth.require, op.handler

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                caller = None
                if op.scope is not None:
                    caller = authenticate(request.headers.get("x-internal-key"))
                    require(caller, op.scope)
                response = await handler(request, caller)
            except QuotaError as exc:
                # A full backlog is a refusal of ours (counted on its own), not an error of
                # Redis or PostgreSQL.
                if isinstance(exc, DependencyUnavailable) and not isinstance(exc, BacklogFull):
                    metrics.DEPENDENCY_ERRORS.labels(exc.dependency).inc()
                    log.warning("%s %s: %s unavailable: %s", op.method, op.path,
                                exc.dependency, exc.message)
                response = error_response(exc)
            self._observe(op.name, response.status_code, time.perf_counter() - started)
            return response

        endpoint.__name__ = op.name
        return endpoint

    def path_endpoint(self, ops: list[Operation]) -> Callable[[Request], Awaitable[Response]]:
        """One endpoint for every method of a path (HEAD answers as GET does); the route
        answers any other method 405, its Allow naming them all (hotpath.app)."""
        by_method = {op.method: self.endpoint(op) for op in ops}
        if "GET" in by_method:
            by_method.setdefault("HEAD", by_method["GET"])

        async def endpoint(request: Request) -> Response:
            return await by_method[request.method](request)

        endpoint.__name__ = ops[0].name
        return endpoint


async def read_json_body(request: Request, limit: int) -> bytes:
    """The raw JSON body, within ``limit`` bytes."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != JSON:
        raise UnsupportedMediaType("Content-Type must be application/json")
    return await read_body(request, limit)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, within ``limit`` bytes (PayloadTooLarge carries what was read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("invalid Content-Length header", field="content-length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes")
        return await request.body()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body larger than {limit} bytes",
                                  extra=b"".join(chunks)[:limit])
    return b"".join(chunks)
