"""The ledger backlog: how many unflushed entries Redis may hold before debits answer 503,
and how far behind the flush is.

The limit is a total over every shard stream, sized to Redis's memory: with MAX_BACKLOG_ENTRIES
unset (0), a quarter of ``maxmemory`` at ENTRY_BYTES an entry, or DEFAULT_TOTAL when Redis
has no ``maxmemory``. Each shard may hold its share (total / N_SHARDS): debit_many.lua
checks its own shard's XLEN, so the sum can never pass the total, and users spread evenly
over the shards (crc32), so the shards fill together.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What one unflushed ledger entry costs Redis, bytes (a debit's stream entry, ~220 B
#: measured by bench/memory.py, rounded up for the stream's own nodes).
ENTRY_BYTES = 256
#: The share of ``maxmemory`` the unflushed ledger may take (the rest: users, counters,
#: idempotency keys).
MEMORY_SHARE = 0.25
#: The total when Redis has no ``maxmemory``: about 512 MB of entries.
DEFAULT_TOTAL = 2_000_000


def backlog_total(configured: int, maxmemory: int) -> int:
    """The total limit: the configured one, or one derived from ``maxmemory`` (bytes; 0
    for none)."""
    if configured > 0:
        return configured
    if maxmemory > 0:
        return max(1, int(maxmemory * MEMORY_SHARE) // ENTRY_BYTES)
    return DEFAULT_TOTAL


def per_shard(total: int, n_shards: int) -> int:
    """Each shard stream's share of the total (at least one entry)."""
    return max(1, total // n_shards)


@dataclass(frozen=True, slots=True)
class Backlog:
    """The unflushed ledger as /ready reports it."""

    entries: int
    limit: int
    oldest_seconds: float
    full_shards: int

    def verdict(self, lag_alert_seconds: float) -> str:
        """``ok``, ``lagging: ...`` (debits still served) or ``full: ...`` (some refused)."""
        if self.full_shards:
            return (f"full: {self.full_shards} shard streams at their limit, debits there "
                    f"answer 503; {self.entries} of {self.limit} entries unflushed, the oldest "
                    f"{self.oldest_seconds:.0f} s old: is a reconciler running?")
        if self.oldest_seconds > lag_alert_seconds:
            return (f"lagging: the oldest unflushed entry is {self.oldest_seconds:.0f} s old "
                    f"(alert at {lag_alert_seconds:.0f} s), {self.entries} of {self.limit} "
                    "entries: is a reconciler running?")
        return "ok"
