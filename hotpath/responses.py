"""The answers: JSON bodies with exact amounts, and the one envelope of every error."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from core.errors import DependencyUnavailable, QuotaError
from hotpath.results import ErrorBody, ErrorOut
from hotpath.schemas import ENCODER

JSON = "application/json"


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON answer with exact amounts (msgspec encodes Decimal as a JSON number)."""
    return Response(ENCODER.encode(payload), status_code=status, media_type=JSON)


def error_body(exc: QuotaError) -> dict[str, Any]:
    """The one shape of every error body, plus what the error carries for the caller."""
    body: dict[str, Any] = {"error": ErrorBody(exc.code, exc.message, exc.field)}
    if isinstance(exc.extra, dict):
        body.update(exc.extra)
    return body


def error_response(exc: QuotaError) -> Response:
    """An error as its status and body (``error_body``); 503s say when to retry."""
    body = error_body(exc)
    headers = {"Retry-After": "1"} if isinstance(exc, DependencyUnavailable) else None
    return Response(ENCODER.encode(body), status_code=exc.status, media_type=JSON,
                    headers=headers)


def envelope(status: int, code: str, message: str) -> Response:
    """An error answered outside a route's handler (unknown path, wrong method, a bug)."""
    return Response(ENCODER.encode(ErrorOut(ErrorBody(code, message))), status_code=status,
                    media_type=JSON)
