"""The clock and the id generator are arguments, so tests can drive them."""

from __future__ import annotations

import os
import time
import uuid
from typing import Protocol


class Clock(Protocol):
    """Where "now" comes from."""

    def now_ms(self) -> int:
        """Milliseconds since the epoch, for Python-side decisions."""
        ...

    def script_now(self) -> int:
        """The ``now`` argument for scripts: 0 lets Redis use its own TIME."""
        ...


class SystemClock:
    """The wall clock; scripts use Redis TIME, the one clock all processes share."""

    def now_ms(self) -> int:
        """Milliseconds since the epoch."""
        return time.time_ns() // 1_000_000

    def script_now(self) -> int:
        """0: the script reads Redis TIME."""
        return 0


class FixedClock:
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, now_ms: int) -> None:
        self._now = now_ms

    def now_ms(self) -> int:
        """The pinned time."""
        return self._now

    def script_now(self) -> int:
        """The pinned time, passed to the scripts instead of Redis TIME."""
        return self._now

    def set(self, now_ms: int) -> None:
        """Move to an absolute time."""
        self._now = now_ms

    def advance(self, ms: int) -> None:
        """Move forward."""
        self._now += ms


def new_tx_id(now_ms: int | None = None) -> str:
    """A time-ordered UUID (version 7 layout): 48 bits of ms, then randomness."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))
