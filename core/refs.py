"""Idempotency records: what Redis remembers of a ref, in as few bytes as it can.

A user's refs live in hash buckets (lua/_common.lua, ``ref_find``): field = 12 bytes of a
hash of (user, ref), value = ``fingerprint(4) | id | stamp(2) | remaining(7)`` where the
script appends the stamp and the remaining. The id is what a retry must be answered:

* a debit's tx id in 8 bytes: debit tx ids are RFC 9562 version 7 UUIDs whose 74 bits
  that are not time or counter come from the same hash of (user, ref), so the tx id is
  its ms, its counter and the ref (``debit_tx``, ``tx_of``);
* any other 16-byte UUID as it is (a tx id made before this layout, restored from the
  ledger; a hold id's random part).

The fingerprint (4 bytes of a hash of meter, amount and reason) tells a retry from a
reuse: a mismatched retry is taken for a duplicate with probability 2**-32.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import time
import uuid

FIELD_BYTES = 12


def ref_hash(user_id: str, ref: str) -> bytes:
    """20 bytes of blake2b of (user, ref): the bucket field (12), then the tx id's bits (8)."""
    return hashlib.blake2b(f"{user_id}\x00{ref}".encode(), digest_size=20).digest()


@functools.lru_cache(maxsize=4096)
def fingerprint(meter: str, amount: int, reason: str) -> bytes:
    """What makes two debits with one ref "the same request", in 4 bytes (remembered: most
    debits repeat a few meters, amounts and reasons; a cold load makes 20 a user)."""
    return hashlib.blake2b(f"{meter}:{amount}:{reason}".encode(), digest_size=4).digest()


def hold_fingerprint(meter: str, units: int, reason: str) -> bytes:
    """What makes two reserves with one ref "the same request" (unlike any debit's)."""
    return hashlib.blake2b(f"hold:{meter}:{units}:{reason}".encode(), digest_size=4).digest()


class _Counter:
    """A 14-bit counter per process (random start, again after a fork): two debits of one
    ref in one ms of one process still get two tx ids."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.it = itertools.count(int.from_bytes(os.urandom(2), "big"))

    def next(self) -> int:
        return next(self.it) & 0x3FFF


_counter = _Counter()
os.register_at_fork(after_in_child=_counter.reseed)


def _tx_bytes(ms: int, counter: int, h: bytes) -> bytes:
    bits = int.from_bytes(h[12:20], "big")  # 64 bits: 12 for rand_a, 48 for the tail
    return (ms.to_bytes(6, "big") + (0x7000 | (bits >> 48 & 0xFFF)).to_bytes(2, "big")
            + (0x8000 | counter).to_bytes(2, "big") + (bits & 0xFFFF_FFFF_FFFF).to_bytes(6, "big"))


def debit_tx(h: bytes, now_ms: int | None = None) -> tuple[str, bytes]:
    """A new debit tx id for the (user, ref) of ``h`` (ref_hash) and its 8-byte record id."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    raw = _tx_bytes(ms, _counter.next(), h)
    return str(uuid.UUID(bytes=raw)), raw[0:6] + raw[8:10]


def record_id(h: bytes, tx_id: str) -> bytes:
    """The record id of a ledger tx id: 8 bytes when it is a debit tx of this (user, ref)
    (``debit_tx``), else its 16 bytes."""
    try:
        raw = bytes.fromhex(tx_id.replace("-", ""))  # the ledger's text of a UUID
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raw = uuid.UUID(tx_id).bytes  # another spelling of one: uuid's parsing, or its error
    # A debit tx of this (user, ref) carries h's 64 bits where _tx_bytes puts them.
    if raw[6:8] == (0x7000 | (int.from_bytes(h[12:14], "big") & 0xFFF)).to_bytes(2, "big") \
            and raw[10:16] == h[14:20] and raw[8] & 0xC0 == 0x80:
        return raw[0:6] + raw[8:10]
    return raw


def tx_of(h: bytes, record: bytes) -> str:
    """The tx id a record id stands for (record_id's inverse)."""
    if len(record) == 8:
        raw = _tx_bytes(int.from_bytes(record[0:6], "big"),
                        int.from_bytes(record[6:8], "big") & 0x3FFF, h)
        return str(uuid.UUID(bytes=raw))
    return str(uuid.UUID(bytes=record))


def reply_bytes(value: str | bytes) -> bytes:
    """A binary script reply as bytes (the hot-path client decodes with surrogateescape)."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def debit_record(user_id: str, ref: str, tx_id: str, meter: str, amount: int,
                 reason: str) -> bytes:
    """A debit's record field and head from its ledger row (a restore)."""
    h = ref_hash(user_id, ref)
    return h[:FIELD_BYTES] + fingerprint(meter, amount, reason) + record_id(h, tx_id)


def hold_record(user_id: str, ref: str, hold_id: str, meter: str, units: int,
                reason: str) -> bytes:
    """A reserve's record field and head: the hold id's 16 random bytes (its tail is the
    user's id, known to whoever asks)."""
    h = ref_hash(user_id, ref)
    return (h[:FIELD_BYTES] + hold_fingerprint(meter, units, reason)
            + bytes.fromhex(hold_id.partition(".")[0]))


def hold_of(record: bytes, hold_id_tail: str) -> str:
    """The hold id a reserve's record id stands for (``hold_record``'s inverse)."""
    return f"{record.hex()}.{hold_id_tail}"
