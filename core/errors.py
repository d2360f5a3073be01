"""Errors are data: one root, small subclasses carrying what the caller needs.

``hotpath.app`` maps each class to a status code and a counter in one place.
"""

from __future__ import annotations

from typing import Any


class QuotaError(Exception):
    """Root of every error the service turns into an HTTP answer."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None, extra: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra


class InvalidInput(QuotaError):
    """The caller's request is malformed or out of bounds; nothing was changed."""

    status = 422
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid") -> None:
        super().__init__(message, field=field)
        self.code = code


class UnsupportedMediaType(InvalidInput):
    """The body is not JSON."""

    status = 415

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unsupported_media_type")


class PayloadTooLarge(InvalidInput):
    """The body exceeds the configured limit; ``extra`` may carry the part that was read."""

    status = 413

    def __init__(self, message: str, *, extra: bytes | None = None) -> None:
        super().__init__(message, code="payload_too_large")
        self.extra = extra


class Unauthorized(QuotaError):
    """Missing or unknown X-Internal-Key."""

    status = 401
    code = "unauthorized"


class Forbidden(QuotaError):
    """A known caller asked for an operation outside its scopes."""

    status = 403
    code = "forbidden"


class InsufficientQuota(QuotaError):
    """The debit would take the meter below zero; nothing was changed."""

    status = 403
    code = "insufficient_quota"


class DuplicateRef(QuotaError):
    """The ref was already debited; ``extra`` carries the original tx_id and balance."""

    status = 409
    code = "duplicate_ref"


class RefReused(InvalidInput):
    """The ref was already used with another amount, meter or reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="ref", code="ref_reused")


class DuplicateOrder(QuotaError):
    """The order was already credited; ``extra`` carries the original result."""

    status = 409
    code = "duplicate_order"


class OrderReused(InvalidInput):
    """The order id was already used with another user, plan, credits or amount."""

    def __init__(self, message: str, field: str = "order_id") -> None:
        super().__init__(message, field=field, code="order_reused")


class VersionConflict(QuotaError):
    """A change made from a version of a resource that is not the current one any more."""

    status = 409
    code = "version_conflict"

    def __init__(self, message: str, current: int) -> None:
        super().__init__(message, field="version", extra={"version": current})


class Rejected(QuotaError):
    """A payment notification that is not processed: it is kept as a dead letter."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None
                 ) -> None:
        super().__init__(message, field=field)
        self.status = status
        self.code = code


class NotFound(QuotaError):
    """An unknown plan (or another named resource)."""

    status = 404
    code = "not_found"


class HoldClosed(QuotaError):
    """The hold was settled, released or expired: code ``hold_<state>``."""

    status = 409

    def __init__(self, state: str, hold_id: str) -> None:
        super().__init__(f"the hold is {state}", field="hold_id", extra={"hold_id": hold_id})
        self.code = f"hold_{state}"


class TooManyHolds(QuotaError):
    """The user has the most open holds allowed (HOLD_MAX_OPEN)."""

    status = 409
    code = "too_many_holds"


class DependencyUnavailable(QuotaError):
    """Redis or PostgreSQL cannot be reached or timed out: answer 503, never 500."""

    status = 503
    code = "unavailable"

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(message)
        self.dependency = dependency


class BacklogFull(DependencyUnavailable):
    """The unflushed ledger is over its limit: refuse rather than accept unrecorded debits."""

    code = "backlog_full"

    def __init__(self, message: str) -> None:
        super().__init__("postgres", message)


class InvariantBroken(AssertionError):
    """A checked invariant failed: a bug, never the caller's fault."""


def invariant(condition: bool, message: str) -> None:
    """Assert an invariant in a way ``python -O`` cannot strip."""
    if not condition:
        raise InvariantBroken(message)
