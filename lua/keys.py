"""Every Redis key, built in one place.

No other module spells a Redis key. Every key of one user carries the hash tag of the
user's virtual shard, ``{NNN}`` = crc32(user_id) mod N_SHARDS, so each script touches one
hash slot (Redis Cluster ready) and each shard has one ledger stream.
"""

from __future__ import annotations

import zlib

from lua.periods import Windows


class Keys:
    """Builds every Redis key, with the deployment's prefix and the shard hash tag."""

    def __init__(self, prefix: str, n_shards: int) -> None:
        assert n_shards > 0
        self.prefix = prefix
        self.n_shards = n_shards
        self._width = max(3, len(str(n_shards - 1)))
        self._tags = [self.tag(s) for s in range(n_shards)]
        self._shared = [(f"{t}:plans", f"{t}:ledger") for t in self._tags]  # per shard

    def shard(self, user_id: str) -> int:
        """The user's virtual shard: crc32 of the id, modulo the shard count."""
        return zlib.crc32(user_id.encode()) % self.n_shards

    def tag(self, shard: int) -> str:
        """The hash-tagged prefix of a shard: ``<prefix>:{NNN}``."""
        return f"{self.prefix}:{{{shard:0{self._width}d}}}"

    def user_base(self, user_id: str) -> str:
        """The prefix of every key of one user (also the user state hash itself)."""
        return f"{self.tag(self.shard(user_id))}:u:{user_id}"

    def user(self, user_id: str) -> str:
        """The user state hash: plan, expiry, credits, lifetime usage, load marker."""
        return self.user_base(user_id)

    def refs(self, user_id: str) -> str:
        """The prefix of the user's idempotency buckets ``<prefix>:r:<n>`` (hashes of
        records, one per idempotency TTL: lua/_common.lua, ref_find; the scripts build
        the buckets' names from it)."""
        return f"{self.user_base(user_id)}:r"

    def ref_bucket(self, user_id: str, bucket: int) -> str:
        """One of the user's idempotency buckets (tests, inspection)."""
        return f"{self.refs(user_id)}:{bucket}"

    def counter(self, user_id: str, meter: str, kind: str, period: str) -> str:
        """A period counter: kind 'd' with a YYYY-MM-DD id, 'm' with a YYYY-MM id, or 'y' (a
        plan's cycle) with its assignment's version (debit_many.lua builds the same key for
        a cycle meter)."""
        return f"{self.user_base(user_id)}:c:{meter}:{kind}:{period}"

    def counters(self, user_id: str, meter: str, windows: Windows) -> tuple[str, str]:
        """The day and month counters of a meter in the given windows."""
        base = f"{self.user_base(user_id)}:c:{meter}"
        return f"{base}:d:{windows.day_id}", f"{base}:m:{windows.month_id}"

    def debit_keys(self, user_id: str, meter: str, windows: Windows
                   ) -> tuple[str, str, str, str, str, str]:
        """KEYS of debit.lua, with the shard computed once (the hot path's only keys)."""
        shard = self.shard(user_id)
        plans, ledger = self._shared[shard]
        base = f"{self._tags[shard]}:u:{user_id}"
        counter = f"{base}:c:{meter}"
        return (base, f"{base}:r", plans, f"{counter}:d:{windows.day_id}",
                f"{counter}:m:{windows.month_id}", ledger)

    def holds(self, shard: int) -> str:
        """A shard's open holds by expiry (the reconciler's sweep; lua/_common.lua)."""
        return f"{self.tag(shard)}:holds"

    def plans(self, shard: int) -> str:
        """A shard's copy of the plan catalog."""
        return f"{self.tag(shard)}:plans"

    def ledger(self, shard: int) -> str:
        """A shard's ledger stream."""
        return f"{self.tag(shard)}:ledger"

    def all_ledgers(self) -> list[str]:
        """Every shard's ledger stream, in shard order."""
        return [self.ledger(s) for s in range(self.n_shards)]

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment."""
        return f"{self.prefix}:{{*"

    def instance(self) -> str:
        """The run_id of the Redis process whose data is in step with PostgreSQL."""
        return f"{self.prefix}:{{meta}}:instance"

    def recovery_lock(self) -> str:
        """The lock of the process that rebuilds after Redis came back older."""
        return f"{self.prefix}:{{meta}}:recovery"

    def shard_instance(self, shard: int) -> str:
        """Under Redis Cluster: the run_id of the node whose copy of this shard is in
        step with PostgreSQL (in the shard's slot, so it moves with the shard)."""
        return f"{self.tag(shard)}:instance"

    def shard_recovery_lock(self, shard: int) -> str:
        """Under Redis Cluster: the lock of the process rebuilding a node's shards (named
        after the first of them)."""
        return f"{self.tag(shard)}:recovery"

    @staticmethod
    def shard_of_key(key: str) -> int | None:
        """The virtual shard in a key's hash tag (None for ``{meta}`` and foreign keys)."""
        start = key.find("{")
        end = key.find("}", start + 1)
        tag = key[start + 1:end] if start >= 0 and end > start else ""
        return int(tag) if tag.isdigit() else None

    def counter_pattern(self) -> str:
        """A SCAN pattern matching every period counter of every user."""
        return f"{self.prefix}:{{*}}:u:*:c:*"

    def user_pattern(self) -> str:
        """A SCAN pattern matching every key of every user (``user_of`` tells the state
        hashes among them from a user's other hashes: holds, ref buckets)."""
        return f"{self.prefix}:{{*}}:u:*"

    @staticmethod
    def user_of(key: str) -> str | None:
        """The user id of a user state hash key; None for any other key of a user's (user
        ids hold no ':', so the state hash's key is the only one without one after it)."""
        user = key.split("}:u:", 1)[1]
        return None if ":" in user else user

    @staticmethod
    def parse_counter(key: str) -> tuple[str, str, str] | None:
        """(user, meter, period id like 'd:2026-11-23', or 'y:<plan version>' for a cycle) of a
        period counter key, or None."""
        parts = key.split("}:u:", 1)[1].split(":")
        if len(parts) != 5 or parts[1] != "c" or parts[3] not in ("d", "m", "y"):
            return None
        return parts[0], parts[2], f"{parts[3]}:{parts[4]}"
