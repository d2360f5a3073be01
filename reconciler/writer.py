"""Batches of ledger events into PostgreSQL: one transaction, idempotent on tx_id."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from core import metrics
from core.events import HOLD_KINDS, BadEvent, LedgerEvent, columns, decode
from persistence.db import Database, PostgresUnavailable
from persistence.queries import QUERIES
from reconciler.consumer import Entry

log = logging.getLogger("quota_gateway.reconciler")

#: SQLSTATE classes that say "try the same batch again later", not "this entry is bad":
#: 08 connection exception, 40 transaction rollback (deadlock, serialization), 53
#: insufficient resources (disk full, out of memory, too many connections), 57 operator
#: intervention (query canceled, shutdown), 58 system error (I/O); and lock not available.
TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
TRANSIENT_STATES = frozenset({"55P03"})


def transient(exc: asyncpg.PostgresError) -> bool:
    """Whether PostgreSQL refused for a reason of its own, not because of the entry."""
    state = str(getattr(exc, "sqlstate", "") or "")
    return state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES


#: Tries at a reused ref's next round before the batch is left for a later retry.
REUSE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Written:
    """What one batch did."""

    inserted: int  # new ledger rows
    duplicates: int  # events already in the ledger (redelivered after a crash)
    poisoned: int  # entries set aside in poison_events
    #: Debits not written because their (user, ref) was already debited in the ledger with
    #: another tx id within the idempotency TTL: Redis lost the first one's traces before it
    #: was flushed, and a retry was debited again.
    ref_conflicts: tuple[str, ...] = ()
    #: Debits of a ref reused past the idempotency TTL (Redis had forgotten it and debited
    #: it as new, as it should): written as the ref's next round (counted in ``inserted``).
    ref_reuses: int = 0


_CLOSED = {"commit": "settled", "release": "released", "expiry": "expired"}


async def apply_holds(conn: asyncpg.Connection, events: list[LedgerEvent]) -> None:
    """Keep the holds table in step with a batch's hold events (in its transaction): new
    holds, later expiries, closings. Each statement is idempotent, so a redelivered batch
    changes nothing; a hold closes once, by its first closing event."""
    opened = [e for e in events if e.kind == "hold"]
    if opened:
        await conn.execute(
            QUERIES["holds_open"], [e.ref for e in opened], [e.user_id for e in opened],
            [e.meter for e in opened], [e.hold_units for e in opened],
            [e.hold_ref or "" for e in opened], [e.reason for e in opened],
            [e.caller for e in opened], [e.action for e in opened],
            [e.remaining or 0 for e in opened], [e.occurred_at for e in opened],
            [e.hold_expires for e in opened], [e.hold_expiry_tx for e in opened])
    extended = [e for e in events if e.kind == "extend"]
    if extended:
        await conn.execute(QUERIES["holds_extend"], [e.ref for e in extended],
                           [e.hold_expires for e in extended])
    closed = [e for e in events if e.kind in _CLOSED]
    if closed:
        settled = [e.kind == "commit" for e in closed]
        rows = await conn.fetch(
            QUERIES["holds_close"], [e.ref for e in closed], [_CLOSED[e.kind] for e in closed],
            [e.occurred_at for e in closed],
            [e.tx_id if s else None for e, s in zip(closed, settled, strict=True)],
            [-e.amount if s else None for e, s in zip(closed, settled, strict=True)],
            [e.from_allowance if s else None for e, s in zip(closed, settled, strict=True)],
            [e.from_credits if s else None for e, s in zip(closed, settled, strict=True)],
            [e.remaining for e in closed])
        for row in rows:  # the service counts the holds it settles and releases
            if row["state"] == "expired":
                metrics.HOLDS.labels(row["meter"], "expired").inc()


class LedgerWriter:
    """Writes stream entries to the ledger; bad entries go to the poison table."""

    def __init__(self, db: Database, idempotency_ttl: timedelta) -> None:
        self.db = db
        self.idempotency_ttl = idempotency_ttl

    async def write(self, entries: Sequence[Entry]) -> Written:
        """Write a batch; raises PostgresUnavailable when it should be retried as a whole."""
        events: list[LedgerEvent] = []
        source: dict[uuid.UUID, Entry] = {}
        bad: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                event = decode(entry.shard, entry.stream_id, entry.fields)
            except BadEvent as exc:
                bad.append((entry, str(exc)))
                continue
            events.append(event)
            source[event.tx_id] = entry
        refused: set[str] = set()
        try:
            inserted = await self._batch(events, bad)
        except asyncpg.PostgresError as exc:
            if transient(exc):
                raise PostgresUnavailable(f"transient failure, batch will be retried: "
                                          f"{exc!r}") from None
            # One event broke the statement: write them one by one to find it.
            log.warning("batch of %d refused (%r); writing events one by one", len(events), exc)
            inserted, refused = await self._one_by_one(events, source, bad)
        skipped = len(events) - inserted - len(refused)
        missing: list[LedgerEvent] = []
        if skipped:  # redelivered, or (debits only) refused by the ledger's (user_id, ref)
            debits = {e.tx_id: e for e in events
                      if e.kind == "debit" and str(e.tx_id) not in refused}
            if debits:
                rows = await self.db.fetch("ledger_missing_tx", list(debits))
                missing = [debits[r["tx_id"]] for r in rows]
        conflicts, reuses, written_meanwhile = [], 0, 0
        for event in sorted(missing, key=lambda e: e.occurred_at):
            outcome = await self._write_reuse(event)
            if outcome == "reuse":
                reuses += 1
            elif outcome == "written":
                written_meanwhile += 1
            else:
                conflicts.append(str(event.tx_id))
                log.warning("debit %s not written: its (user, ref) is already debited in "
                            "the ledger by another tx within the idempotency TTL", event.tx_id)
        return Written(inserted + reuses, skipped - len(missing) + written_meanwhile, len(bad),
                       tuple(conflicts), reuses)

    async def _write_reuse(self, event: LedgerEvent) -> str:
        """Settle a debit the ledger refused: ``"reuse"`` when no debit of its ref lies
        within the idempotency TTL of it (Redis had forgotten the ref and debited it as
        new), written as the ref's next round; ``"conflict"`` when one does (a double debit
        after Redis lost data: refused); ``"written"`` when another reconciler, holding the
        same entry, wrote it meanwhile (then it is a duplicate here)."""
        for _ in range(REUSE_ATTEMPTS):  # another reconciler may take the same round first
            if not await self.db.fetch("ledger_missing_tx", [event.tx_id]):
                return "written"
            rounds = await self.db.fetchrow("debit_ref_rounds", event.user_id, event.ref,
                                            event.occurred_at, self.idempotency_ttl)
            assert rounds is not None  # an aggregate answers one row
            if rounds["near"]:
                return "conflict"
            last = rounds["last_round"]
            reuse = dataclasses.replace(event, ref_round=0 if last is None else last + 1)
            if await self._batch([reuse], []):
                log.info("debit %s: ref %r of %s reused past the idempotency TTL, written "
                         "as round %d", event.tx_id, event.ref, event.user_id, reuse.ref_round)
                return "reuse"
        # Never dropped: the batch stays pending and is written again later (its rows
        # committed so far are duplicates by then).
        raise PostgresUnavailable(f"debit {event.tx_id}: the next round of its ref was taken "
                                  f"{REUSE_ATTEMPTS} times in a row; the batch will be retried")

    async def _batch(self, events: list[LedgerEvent], bad: list[tuple[Entry, str]]) -> int:
        async with self.db.transaction() as conn:
            inserted = 0
            if events:
                inserted = int(await conn.fetchval(QUERIES["flush_events"], *columns(events)))
                holds = [e for e in events if e.kind in HOLD_KINDS]
                if holds:
                    await apply_holds(conn, holds)
            await self._poison(conn, bad)
        return inserted

    async def _one_by_one(self, events: list[LedgerEvent], source: dict[uuid.UUID, Entry],
                          bad: list[tuple[Entry, str]]) -> tuple[int, set[str]]:
        """Returns (inserted, tx ids refused): refused events join ``bad``."""
        inserted = 0
        refused: set[str] = set()
        for event in events:
            try:
                inserted += await self._batch([event], [])
            except asyncpg.PostgresError as exc:
                if transient(exc):
                    raise PostgresUnavailable(f"transient failure: {exc!r}") from None
                bad.append((source[event.tx_id], f"{type(exc).__name__}: {exc}"))
                refused.add(str(event.tx_id))
        async with self.db.transaction() as conn:
            await self._poison(conn, bad)
        return inserted, refused

    @staticmethod
    async def _poison(conn: asyncpg.Connection, bad: list[tuple[Entry, str]]) -> None:
        for entry, error in bad:
            log.error("poison ledger entry shard=%d id=%s: %s", entry.shard, entry.stream_id,
                      error)
            await conn.execute(QUERIES["insert_poison"], entry.shard, entry.stream_id,
                               entry.fields, error)
