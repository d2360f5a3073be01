"""The Starlette app: the routes of ``hotpath.routes`` around one engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.settings import Settings, load_settings
from hotpath.auth import Authenticator
from hotpath.front import Endpoint, HotFront
from hotpath.handlers import Api
from hotpath.responses import envelope
from hotpath.routes import operations
from hotpath.routing import Endpoints, Operation
from payments.verifiers import Verifier
from quota.engine import Engine, make_engine


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = envelope(exc.status_code, code, str(exc.detail))
    for name, value in (exc.headers or {}).items():
        if name.lower() == "allow":  # a 405's: the methods of the path, in a stable order
            value = ", ".join(sorted(m.strip() for m in value.split(",")))
        response.headers[name] = value
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler, so the server logs the traceback once.
    return envelope(500, "internal", "internal error; it has been logged")


def build_app(settings: Settings, engine: Engine, *, owns_resources: bool = True,
              verifier: Verifier | None = None) -> HotFront:
    """The app around an engine (tests pass their own engine, clock, verifier): the
    Starlette app behind the front that answers the routes themselves (hotpath.front)."""
    api = Api(settings, engine, verifier)
    endpoints = Endpoints(Authenticator(settings.all_callers()))
    by_path: dict[str, list[Operation]] = {}
    for op in operations(api):
        by_path.setdefault(op.path, []).append(op)
    # One route per path with all its methods: any other method is 405 with an Allow that
    # names them all (with a route per operation, it would name the first route's only).
    routes = [Route(path, endpoints.path_endpoint(ops), methods=[op.method for op in ops],
                    name=ops[0].name)
              for path, ops in by_path.items()]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await api.webhook.verifier.aclose()
        if owns_resources:
            await engine.close()

    app = Starlette(
        routes=routes, lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
    )
    # A path with a trailing '/' too many (an empty path parameter) is 404, not a redirect
    # to another route.
    app.router.redirect_slashes = False
    app.state.api = api
    # The front: every route by an exact method and path (a path with one parameter last,
    # GET only, by its prefix); HEAD, 404 and 405 stay Starlette's.
    exact: dict[tuple[str, str], Endpoint] = {}
    prefixed: dict[str, tuple[str, Endpoint]] = {}
    for op in operations(api):
        if "{" not in op.path:
            exact[(op.method, op.path)] = endpoints.endpoint(op)
        elif op.method == "GET" and op.path.endswith("}") and op.path.count("{") == 1:
            prefix, _, param = op.path.partition("{")
            prefixed[prefix] = (param[:-1], endpoints.endpoint(op))
    return HotFront(app, exact, prefixed)


def create_app() -> HotFront:
    """The uvicorn factory: settings from the environment, real clock."""
    settings = load_settings()
    return build_app(settings, make_engine(settings))
