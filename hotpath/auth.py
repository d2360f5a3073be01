"""X-Internal-Key authentication with named callers and scopes."""

from __future__ import annotations

import hashlib
import hmac

from core.errors import Forbidden, Unauthorized
from core.settings import Caller


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Authenticator:
    """Finds the caller of a key; the comparison takes the same time whatever the key."""

    def __init__(self, callers: tuple[Caller, ...]) -> None:
        self._callers = [(_digest(c.key), c) for c in callers]

    def authenticate(self, key: str | None) -> Caller:
        """The caller owning ``key``, or Unauthorized."""
        if not key:
            raise Unauthorized("missing X-Internal-Key header")
        digest = _digest(key)
        found = None
        for known, caller in self._callers:  # every entry is compared: no early exit
            if hmac.compare_digest(known, digest):
                found = caller
        if found is None:
            raise Unauthorized("invalid X-Internal-Key")
        return found

    @staticmethod
    def require(caller: Caller, scope: str) -> None:
        """Forbidden unless the caller holds ``scope``."""
        if scope not in caller.scopes:
            raise Forbidden(f"caller {caller.name!r} may not perform {scope!r} operations")
