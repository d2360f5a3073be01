"""The clock and the id generator are arguments, so tests can drive them."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    """An aware datetime as exact epoch milliseconds."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return EPOCH + timedelta(milliseconds=ms)


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


class _TxIds:
    """Time-ordered UUIDs (RFC 9562 version 7) made cheaply: a tx id per debit.

    Layout: 48 bits of ms | version 7 and 12 random bits | variant 0b10 and a 14-bit
    counter | 48 random bits. The random bits are drawn once per process (again after a
    fork, and whenever the clock goes back): ids need to be unique, not secret. Within a
    process the (ms, counter) pair does not repeat while time moves forward (16,384 ids in
    one millisecond before the counter wraps); a clock stepped back (NTP, a VM resumed)
    would revisit milliseconds with the counter elsewhere, so new random bits are drawn
    then. Between processes the 60 random bits tell them apart. The text up to the counter
    is made once per ms.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        bits = int.from_bytes(os.urandom(10), "big")
        self.rand_a = bits & 0xFFF
        self.suffix = f"{bits >> 12 & 0xFFFF_FFFF_FFFF:012x}"
        self.counter = bits >> 60 & 0x3FFF
        self.ms = -1
        self.prefix = ""

    def new(self, now_ms: int | None = None) -> str:
        ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if ms != self.ms:
            if ms < self.ms:  # an earlier ms comes again: ids from other random bits
                self.reseed()
            self.ms = ms
            self.prefix = "%08x-%04x-%04x-" % (  # noqa: UP031  (measured faster)
                ms >> 16 & 0xFFFF_FFFF, ms & 0xFFFF, 0x7000 | self.rand_a)
        self.counter = counter = (self.counter + 1) & 0x3FFF
        return "%s%04x-%s" % (self.prefix, 0x8000 | counter, self.suffix)  # noqa: UP031


_tx_ids = _TxIds()
#: A new tx id (``now_ms``: the time it carries; default the wall clock).
new_tx_id = _tx_ids.new


def _reseed_after_fork() -> None:
    _tx_ids.reseed()


os.register_at_fork(after_in_child=_reseed_after_fork)
