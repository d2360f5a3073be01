"""Typed errors: one base, a class per kind of answer the caller acts on differently.

Every error the service answers has the body ``{"error": {"code", "message", "field"},
...extra}``; the exception carries the status, the code, the message, the field and the
whole body (``body``, amounts as Decimals).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any


class QuotaGatewayError(Exception):
    """Base of every error this client raises."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 field: str | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.body = body or {}

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        head = f"{self.status} {self.code}: " if self.status else ""
        return f"{head}{self.message}{where}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
                f"message={self.message!r}, field={self.field!r})")


class InvalidInput(QuotaGatewayError):
    """422 (also 400, 413, 415): the request is malformed or out of bounds; ``field``
    names the offending field (``ref`` with code ``ref_reused``: the same ref with another
    amount, meter or reason). Nothing was changed; do not retry as is."""


class Unauthorized(QuotaGatewayError):
    """401: the ``X-Internal-Key`` is missing or unknown."""


class Forbidden(Unauthorized):
    """403 ``forbidden``: the key is valid but lacks the scope for this operation."""


class InsufficientQuota(QuotaGatewayError):
    """403 ``insufficient_quota``: nothing was debited. ``remaining`` is what the meter has
    left (the balance for the seed-002 API); ``available`` is what a hold's settle could
    still cover."""

    def __init__(self, message: str, *, remaining: Decimal | None = None,
                 available: Decimal | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.remaining = remaining
        self.available = available


class NotFound(QuotaGatewayError):
    """404: an unknown plan, hold or route."""


class Conflict(QuotaGatewayError):
    """409 the client cannot turn into a result (a duplicate ref or order never raises:
    it is returned as the original result)."""


class HoldExpired(Conflict):
    """409 ``hold_expired``: the hold outlived its ttl; its units went back."""


class HoldReleased(Conflict):
    """409 ``hold_released``: the hold was released; nothing can be settled on it."""


class HoldSettled(Conflict):
    """409 ``hold_settled``: the hold was settled (with other units)."""


class Unavailable(QuotaGatewayError):
    """503 (also 502, 504): the service or its Redis/PostgreSQL is unavailable, after
    the client's retries. ``retry_after`` is the service's hint in seconds. Retrying
    later with the same ref is safe."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any
                 ) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ConnectionFailed(Unavailable):
    """The service could not be reached or the connection failed (refused, reset, dropped,
    timed out) on every attempt. A debit may or may not have been made: retrying with the
    same ref returns it if it was, and makes it once if it was not."""


class ServerError(QuotaGatewayError):
    """Another 5xx: a bug in the service; not retried."""


_CONFLICTS: dict[str, type[Conflict]] = {
    "hold_expired": HoldExpired, "hold_released": HoldReleased, "hold_settled": HoldSettled,
}


def _amount(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        return value
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def error_from(status: int, body: Any, retry_after: float | None = None) -> QuotaGatewayError:
    """The exception an error answer means."""
    body = body if isinstance(body, dict) else {}
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    message = str(error.get("message") or f"HTTP {status}")
    args: dict[str, Any] = {"status": status, "code": code, "field": error.get("field"),
                            "body": body}
    if status == 401:
        return Unauthorized(message, **args)
    if status == 403:
        if code == "forbidden":
            return Forbidden(message, **args)
        remaining = body.get("remaining", body.get("balance"))
        return InsufficientQuota(message, remaining=_amount(remaining),
                                 available=_amount(body.get("available")), **args)
    if status == 404:
        return NotFound(message, **args)
    if status == 409:
        return _CONFLICTS.get(code or "", Conflict)(message, **args)
    if status in (400, 413, 415, 422):
        return InvalidInput(message, **args)
    if status in (502, 503, 504):
        return Unavailable(message, retry_after=retry_after, **args)
    if status >= 500:
        return ServerError(message, **args)
    return QuotaGatewayError(message, **args)
