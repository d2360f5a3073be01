"""Poisoned ledger entries: stream entries the writer set aside (malformed, or refused by
PostgreSQL for a reason of the entry's own), listed, shown and written to the ledger once
their cause is fixed. A replay goes through the same writer as the flush, so it is
idempotent on tx_id: an entry already in the ledger is a duplicate, not a second row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from core.errors import NotFound
from core.events import BadEvent, unpack
from persistence.db import Database
from reconciler.consumer import Entry
from reconciler.writer import LedgerWriter


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay did: ``written`` (a new ledger row), ``duplicate`` (already there),
    or ``refused`` with the reason (the entry is still poison)."""

    outcome: str
    detail: str = ""


def summary(fields: dict[str, str]) -> dict[str, str]:
    """The entry's kind, tx id, user and amount where its text can be read."""
    try:
        values = unpack(fields)
    except BadEvent as exc:
        return {"unreadable": str(exc)}
    return {name: values.get(key, "") for name, key in
            (("kind", "k"), ("tx_id", "tx"), ("user_id", "u"), ("meter", "m"), ("amount", "a"))}


class Poison:
    """The poison_events table, for an operator."""

    def __init__(self, db: Database, idempotency_ttl: timedelta) -> None:
        self.db = db
        self.writer = LedgerWriter(db, idempotency_ttl)

    async def list(self, *, include_replayed: bool, limit: int) -> list[Any]:
        """Newest first; by default only the ones not replayed yet."""
        return list(await self.db.fetch("list_poison", include_replayed, limit))

    async def show(self, poison_id: int) -> Any:
        """One entry whole; NotFound if there is none."""
        row = await self.db.fetchrow("get_poison", poison_id)
        if row is None:
            raise NotFound(f"no poisoned entry {poison_id}", field="id")
        return row

    async def replay(self, poison_id: int) -> Replayed:
        """Write the entry to the ledger through the writer; mark it replayed unless it
        is refused again (then it stays as it was, with its first error)."""
        row = await self.show(poison_id)
        entry = Entry(row["shard"], row["stream_id"], dict(row["fields"]))
        written = await self.writer.write([entry])
        if written.poisoned:
            return Replayed("refused", "still refused: see `poison show` for its error")
        if written.ref_conflicts:
            return Replayed("refused", "its (user, ref) is debited in the ledger by another "
                                       "tx within the idempotency TTL")
        outcome = "written" if written.inserted else "duplicate"
        await self.db.fetchval("mark_poison_replayed", poison_id, outcome)
        return Replayed(outcome)
