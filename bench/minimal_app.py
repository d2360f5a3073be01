"""The floor of an HTTP debit on this stack: a minimal Starlette endpoint (issue #20, row 4).

``POST /internal/billing/quota/debit``: the ``X-Internal-Key`` compared with the token,
the body parsed by orjson, its four fields checked (ids' type and length, ``action`` one
of the two, ``units`` a positive number), and a small JSON answer. No metrics, no
validation framework, no engine: what any Python service on Starlette and uvicorn pays per
request before it does anything. Served as ``quota-gateway serve`` serves the app
(``ops.workers.run_uvicorn``: uvloop, httptools, no access log)::

    python -m bench.minimal_app --port 8004 --workers 2
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ops.workers import run_uvicorn

TOKEN = os.environ.get("SERVICE_TOKEN", "super-secret-dev")
ACTIONS = frozenset(("chat_tokens", "tpl_run"))
_JSON = "application/json"


def _error(status: int, code: str) -> Response:
    return Response(orjson.dumps({"error": {"code": code}}), status_code=status,
                    media_type=_JSON)


def _ident(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 128


async def debit(request: Request) -> Response:
    if request.headers.get("x-internal-key") != TOKEN:
        return _error(401, "unauthorized")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return _error(400, "invalid_json")
    if not isinstance(body, dict) or not _ident(body.get("user_id")) \
            or not _ident(body.get("ref")) or body.get("action") not in ACTIONS:
        return _error(422, "invalid_input")
    units = body.get("units")
    if isinstance(units, bool) or not isinstance(units, int | float) or units <= 0:
        return _error(422, "invalid_input")
    return Response(orjson.dumps({"tx_id": body["ref"], "remaining": 999_999_000}),
                    media_type=_JSON)


def create_app() -> Starlette:
    """The uvicorn factory."""
    return Starlette(routes=[Route("/internal/billing/quota/debit", debit, methods=["POST"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8004)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    run_uvicorn("bench.minimal_app:create_app", args.host, args.port, args.workers)


if __name__ == "__main__":
    main()
