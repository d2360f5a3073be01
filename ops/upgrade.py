"""Upgrades of what Redis holds: the idempotency records of builds before the ref buckets.

Builds before issue #20's buckets remembered a debit's ref as a string key
``<user key>:r:<ref>`` = ``fingerprint \\n tx id \\n remaining``; the scripts now read only
the buckets (lua/_common.lua). ``convert_legacy_refs`` puts each such debit into its bucket,
from its ledger row (the string holds only a digest of the reason, and the bucket's
fingerprint needs the reason itself), then deletes the string. A string whose debit is not
in the ledger yet (not flushed) is left for the next run; one past its TTL is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis

from core import refs
from core.clock import to_ms
from quota.engine import Engine

#: Strings converted per round (one ledger query, one restore call per user).
BATCH = 500


@dataclass
class Converted:
    """What a run did."""

    converted: int = 0  # written into their bucket (or already there)
    expired: int = 0  # past their TTL: deleted
    waiting: list[str] = field(default_factory=list)  # not in the ledger yet: kept


def _legacy(key: str) -> tuple[str, str] | None:
    """(user, ref) of an old ref key ``...}:u:<user>:r:<ref>``; None for any other key."""
    _, _, rest = key.partition("}:u:")
    user, sep, ref = rest.partition(":r:")
    return (user, ref) if sep and user and ref and ":" not in user else None


async def convert_legacy_refs(engine: Engine, redis: aioredis.Redis) -> Converted:
    """Convert every old ref string of this deployment's prefix (see the module's text)."""
    done = Converted()
    batch: list[tuple[str, str, str]] = []
    pattern = f"{engine.keys.prefix}:{{*}}:u:*:r:*"
    async for key in redis.scan_iter(match=pattern, count=1000, _type="string"):
        owner = _legacy(key)
        if owner is not None:
            batch.append((key, *owner))
        if len(batch) >= BATCH:
            await _convert(engine, redis, batch, done)
            batch = []
    if batch:
        await _convert(engine, redis, batch, done)
    return done


async def _convert(engine: Engine, redis: aioredis.Redis, batch: list[tuple[str, str, str]],
                   done: Converted) -> None:
    values = [await redis.get(key) for key, _, _ in batch]
    wanted: dict[str, tuple[str, str, str]] = {}
    for (key, user, ref), value in zip(batch, values, strict=True):
        if value is None:  # expired meanwhile
            done.expired += 1
            continue
        text = value.decode() if isinstance(value, bytes) else str(value)
        _, tx_id, _ = text.split("\n", 2)
        wanted[tx_id] = (key, user, ref)
    rows = await engine.db.fetch("ledger_debits_by_tx", list(wanted))
    ttl_ms = engine.settings.idempotency_ttl_seconds * 1000
    found = set()
    for row in rows:
        tx_id = str(row["tx_id"])
        key, user, ref = wanted[tx_id]
        record = refs.debit_record(user, ref, tx_id, row["meter"], -row["amount_micro"],
                                   row["reason"] or "")
        await engine.rt.scripts.restore_refs(
            engine.keys.refs(user), now=engine.clock.script_now(), ttl_ms=ttl_ms,
            records=[(record, max(0, row["remaining_micro"] or 0),
                      to_ms(row["occurred_at"]))])
        await redis.unlink(key)
        found.add(tx_id)
        done.converted += 1
    done.waiting += [wanted[tx][0] for tx in wanted if tx not in found]
