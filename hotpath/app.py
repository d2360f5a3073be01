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
from hotpath.handlers import Api
from hotpath.responses import envelope
from hotpath.routes import operations
from hotpath.routing import Endpoints
from payments.verifiers import Verifier
from quota.engine import Engine, make_engine


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return envelope(exc.status_code, code, str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Starlette re-raises after this handler, so the server logs the traceback once.
    return envelope(500, "internal", "internal error; it has been logged")


def build_app(settings: Settings, engine: Engine, *, owns_resources: bool = True,
              verifier: Verifier | None = None) -> Starlette:
    """The Starlette app around an engine (tests pass their own engine, clock, verifier)."""
    api = Api(settings, engine, verifier)
    endpoints = Endpoints(Authenticator(settings.all_callers()))
    routes = [
        Route(op.path, endpoints.endpoint(op), methods=[op.method], name=op.name)
        for op in operations(api)
    ]

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
    app.state.api = api
    return app


def create_app() -> Starlette:
    """The uvicorn factory: settings from the environment, real clock."""
    settings = load_settings()
    return build_app(settings, make_engine(settings))
