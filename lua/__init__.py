"""The Redis side: the key layout, the scripts, and one typed wrapper per script.

No other module spells a Redis key. Every key of one user carries the hash tag of the
user's virtual shard, ``{NNN}`` = crc32(user_id) mod N_SHARDS, so each script touches one
hash slot (Redis Cluster ready) and each shard has one ledger stream.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, Protocol

from lua.periods import Windows

__all__ = [
    "SCRIPTS",
    "CheckReply",
    "DebitReply",
    "Keys",
    "MeterView",
    "Script",
    "ScriptRunner",
    "Status",
]


class Status(IntEnum):
    """First element of every script reply (mirrors the constants in _common.lua)."""

    OK = 1
    DUPLICATE = 2
    REF_REUSED = 3
    INSUFFICIENT = 4
    NOT_LOADED = 5
    STALE_WINDOW = 6
    BACKLOG = 7
    NEED_METERS = 9


#: Status by its code (an index is faster than ``Status(code)`` on the hot path).
_STATUS_BY_CODE: dict[int, Status] = {s.value: s for s in Status}


@dataclass(frozen=True, slots=True)
class Script:
    """One registered script: its name, full source (prelude included) and SHA1."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        """Read ``<name>.lua`` and the shared prelude from the package."""
        folder = resources.files(__package__)
        source = "\n".join((folder / f).read_text(encoding="utf-8")
                           for f in ("_common.lua", f"{name}.lua"))
        return cls(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


#: One script per operation; "debit_many" is the hot path's debits, one or a batch of
#: them per call (see lua/connection.py).
SCRIPTS: dict[str, Script] = {
    name: Script.load(name)
    for name in ("debit_many", "check", "load_user", "restore_refs", "load_catalog",
                 "set_plan", "apply_payment")
}


class ScriptRunner(Protocol):
    """What a Redis client must offer the wrappers: EVALSHA with NOSCRIPT fallback."""

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """Run ``script`` by EVALSHA; on NOSCRIPT, send its source and retry once."""
        ...


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

    def idempotency(self, user_id: str, ref: str) -> str:
        """The key remembering one (user, ref) debit."""
        return f"{self.user_base(user_id)}:r:{ref}"

    def counter(self, user_id: str, meter: str, kind: str, period: str) -> str:
        """A period counter: kind 'd' with a YYYY-MM-DD id or 'm' with a YYYY-MM id."""
        return f"{self.user_base(user_id)}:c:{meter}:{kind}:{period}"

    def counters(self, user_id: str, meter: str, windows: Windows) -> tuple[str, str]:
        """The day and month counters of a meter in the given windows."""
        base = f"{self.user_base(user_id)}:c:{meter}"
        return f"{base}:d:{windows.day_id}", f"{base}:m:{windows.month_id}"

    def debit_keys(self, user_id: str, ref: str, meter: str, windows: Windows
                   ) -> tuple[str, str, str, str, str, str]:
        """KEYS of debit.lua, with the shard computed once (the hot path's only keys)."""
        shard = self.shard(user_id)
        plans, ledger = self._shared[shard]
        base = f"{self._tags[shard]}:u:{user_id}"
        counter = f"{base}:c:{meter}"
        return (base, f"{base}:r:{ref}", plans, f"{counter}:d:{windows.day_id}",
                f"{counter}:m:{windows.month_id}", ledger)

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

    def counter_pattern(self) -> str:
        """A SCAN pattern matching every period counter of every user."""
        return f"{self.prefix}:{{*}}:u:*:c:*"

    def user_pattern(self) -> str:
        """A SCAN pattern matching every user key (SCAN with TYPE hash: the state hashes)."""
        return f"{self.prefix}:{{*}}:u:*"

    @staticmethod
    def user_of(key: str) -> str:
        """The user id of a user state hash key (user ids hold no ':')."""
        return key.split("}:u:", 1)[1]

    @staticmethod
    def parse_counter(key: str) -> tuple[str, str, str] | None:
        """(user, meter, period id like 'd:2026-11-23') of a period counter key, or None."""
        parts = key.split("}:u:", 1)[1].split(":")
        if len(parts) != 5 or parts[1] != "c" or parts[3] not in ("d", "m"):
            return None
        return parts[0], parts[2], f"{parts[3]}:{parts[4]}"


@dataclass(slots=True)
class DebitReply:
    """The decoded reply of debit.lua (fields unused by a status are zero or empty; the
    rule's limit, period and plan status come only with INSUFFICIENT)."""

    status: Status
    tx_id: str = ""
    remaining: int = 0
    from_allowance: int = 0
    from_credits: int = 0
    limit: int = 0
    period: str = ""
    period_end_ms: int = 0
    plan_code: str = ""
    plan_status: str = ""
    detail: str = ""  # NOT_LOADED: what is missing
    now_ms: int = 0  # STALE_WINDOW: Redis' clock
    backlog: int = 0  # BACKLOG: entries in the shard stream

    @classmethod
    def decode(cls, reply: list[Any], tx_id: str, amount: int) -> DebitReply:
        """Turn the flat script reply into fields, by status; ``tx_id`` and ``amount`` are
        the debit's own (an OK reply leaves out what the caller knows)."""
        status = _STATUS_BY_CODE[reply[0]]
        if status is Status.OK:
            _, remaining, from_credits, code = reply
            return cls(status, tx_id, remaining, amount - from_credits, from_credits,
                       plan_code=code)
        if status is Status.DUPLICATE:
            return cls(status, tx_id=reply[1], remaining=reply[2])
        if status is Status.INSUFFICIENT:
            rem, limit, period, end, code, pstatus = reply[1:7]
            return cls(status, remaining=rem, limit=limit, period=period, period_end_ms=end,
                       plan_code=code, plan_status=pstatus)
        if status is Status.NOT_LOADED:
            return cls(status, detail=reply[1])
        if status is Status.STALE_WINDOW:
            return cls(status, now_ms=reply[1])
        if status is Status.BACKLOG:
            return cls(status, backlog=reply[1])
        return cls(status)


@dataclass(frozen=True, slots=True)
class MeterView:
    """One meter of a check: its rule, usage and what remains (micro-units)."""

    meter: str
    period: str
    limit: int
    used: int
    credits: int
    remaining: int
    period_end_ms: int


@dataclass(frozen=True, slots=True)
class CheckReply:
    """The decoded reply of check.lua."""

    status: Status
    plan_code: str = ""
    plan_status: str = ""
    assigned_plan: str = ""
    expires_ms: int = 0
    meters: tuple[MeterView, ...] = ()
    detail: str = ""
    now_ms: int = 0

    @classmethod
    def decode(cls, reply: list[Any]) -> CheckReply:
        """Turn the flat script reply into fields, by status."""
        status = Status(reply[0])
        if status is Status.OK:
            code, pstatus, assigned, exp, n = reply[1:6]
            rows = reply[6:]
            assert len(rows) == 7 * n, "check.lua must return seven values per meter"
            meters = tuple(MeterView(*rows[i : i + 7]) for i in range(0, len(rows), 7))
            return cls(status, code, pstatus, assigned, exp, meters)
        if status in (Status.NOT_LOADED, Status.NEED_METERS):
            return cls(status, detail=reply[1])
        if status is Status.STALE_WINDOW:
            return cls(status, now_ms=reply[1])
        return cls(status)
