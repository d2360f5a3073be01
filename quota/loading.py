"""Loading from PostgreSQL: a user's state (plan, credits, usage, recent refs) and the plan
catalog, written into Redis only where Redis lacks them.

Missing state is not zero usage: a script that finds no user hash answers NOT_LOADED, and
the engine calls ``Loader.load_user`` before it tries again.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from core import metrics, refs
from core.clock import from_ms, to_ms
from core.errors import DependencyUnavailable, InvariantBroken
from lua.periods import Windows
from persistence.plans import catalog_fields, list_plans
from quota.runtime import Runtime

#: How far this process's clock may run ahead of Redis's without an idempotency key being
#: left out when a user's keys are restored from the ledger (``Loader.restore_refs``).
RESTORE_CLOCK_MARGIN_MS = 3_600_000
#: Ledger rows read, and idempotency keys restored, per page: a history of one page goes
#: with load_user.lua's call, a longer one is restored a restore_refs call a page first.
RESTORE_PAGE = 500
#: The most users whose state one statement reads.
LOAD_BATCH = 100


def _seen(task: asyncio.Task[None]) -> None:
    """A batch read's own failure reached its waiters; do not report it again."""
    if not task.cancelled():
        task.exception()


def hold_record(row: Sequence[Any]) -> str:
    """An open hold of ``user_load_state`` as Redis keeps it (lua/_common.lua): meter,
    units, expires ms, expiry tx, ref, caller, action, reason."""
    (_, meter, units, ref, reason, caller, action, _, expiry_tx, _, _, expires_ms) = row[:12]
    return "\x1f".join((meter, str(units), str(expires_ms), str(expiry_tx), ref, caller,
                         action, reason))


def debit_records(user_id: str, page: Sequence[Sequence[Any]]) -> list[tuple[bytes, int, int]]:
    """Idempotency records of ledger debits (``user_load_state``'s or
    ``user_recent_debits``' rows: ref, tx id, meter, amount, reason, remaining, ms, time),
    as restore_refs.lua and load_user.lua put them back: field and head, remaining, ms."""
    return [
        # A debit flushed before migration 0004 has no remaining recorded: 0.
        (refs.debit_record(user_id, ref, tx_id, meter, -amount, reason or ""),
         max(0, remaining or 0), occurred_ms)
        for ref, tx_id, meter, amount, reason, remaining, occurred_ms, _ in page
    ]


class Loader:
    """Brings users and the catalog from PostgreSQL into Redis."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._loading: dict[str, asyncio.Task[None]] = {}  # user loads in flight
        # Users whose state is to be read, by the read's arguments: the loads of one tick
        # share one statement (``_read_states``).
        self._wanted: dict[tuple[tuple[str, ...], int], dict[str, asyncio.Future[Any]]] = {}

    async def load(self, what: str, user_id: str, windows: Windows) -> None:
        """Load what a NOT_LOADED answer named: 'catalog' (the user's shard) or the user."""
        if what == "catalog":
            await self.sync_catalog([self.rt.keys.shard(user_id)])
        else:
            await self.load_user(user_id, windows)

    # -- the catalog -----------------------------------------------------------------------
    async def sync_catalog(self, shards: Sequence[int] | None = None) -> int:
        """Copy the plan catalog from PostgreSQL into the given shards (default: all)."""
        rt = self.rt
        plans = await list_plans(rt.db)
        if not any(p.plan_code == rt.settings.default_plan for p in plans):
            raise InvariantBroken(
                f"the default plan {rt.settings.default_plan!r} is not in the catalog: "
                "run `quota-gateway migrate`"
            )
        version = max(p.version for p in plans)
        fields = catalog_fields(plans)
        targets = range(rt.settings.n_shards) if shards is None else shards
        calls = [asyncio.ensure_future(
            rt.scripts.load_catalog(rt.keys.plans(s), version=version, fields=fields))
            for s in targets]
        try:
            results = await asyncio.gather(*calls)
        except BaseException:  # one failed: the others stop too, none left running
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            raise
        return sum(results)

    async def resync_catalog(self) -> int:
        """Bring every shard copy that is older than PostgreSQL's catalog up to date;
        returns how many were. A plan change committed in PostgreSQL whose copying to the
        shards failed half-way would otherwise leave those shards on the old rules for
        good: only a missing copy is refilled by the debits themselves. The reconciler
        runs this with its chores."""
        rt = self.rt
        version = await rt.db.fetchval("catalog_version")
        held = await asyncio.gather(*(rt.redis.execute("HGET", rt.keys.plans(s), "~v")
                                      for s in range(rt.settings.n_shards)))
        stale = [s for s, v in enumerate(held) if v is not None and int(v) < version]
        if stale:
            await self.sync_catalog(stale)
        return len(stale)

    # -- one user --------------------------------------------------------------------------
    async def load_user(self, user_id: str, windows: Windows) -> None:
        """Write the user's PostgreSQL state into Redis where Redis lacks it: first the
        idempotency keys of recent debits, then the state (which marks the user loaded).

        Concurrent loads of one user in this process share one: after Redis lost its data,
        every request of a busy user answers "not loaded" at once, and each would otherwise
        read the same rows from PostgreSQL.
        """
        task = self._loading.get(user_id)
        if task is None:
            task = asyncio.ensure_future(self._load_user(user_id, windows))
            self._loading[user_id] = task
            task.add_done_callback(functools.partial(self._load_done, user_id))
        await asyncio.shield(task)  # a caller that goes away leaves the load running

    def _load_done(self, user_id: str, task: asyncio.Task[None]) -> None:
        self._loading.pop(user_id, None)
        if not task.cancelled():
            task.exception()  # seen here too, in case every caller went away

    async def _load_user(self, user_id: str, windows: Windows) -> None:
        rt = self.rt
        user_key = rt.keys.user(user_id)
        for _ in range(rt.settings.load_retries):
            loaded, generation = await rt.redis.execute("HMGET", user_key, "loaded", "wg")
            if loaded:
                return  # another process loaded it meanwhile
            state = await self._read_state(user_id, windows)
            if len(state["refs"]) >= RESTORE_PAGE:
                # More than the first page may follow: every page is restored before the
                # state (the user is not loaded until its keys are). One page goes in with
                # the state's own script call.
                await self.restore_refs(user_id, first_page=state["refs"])
                state["refs"] = []
            if state["holds"]:  # the refs of recent reserves, the results of closed holds
                await self._restore_hold_keys(user_id, state["holds"])
            written, restored = await self._write_state(user_id, user_key, generation or "0",
                                                        windows, state)
            if written == 1:
                metrics.USER_LOADS.inc()
                if restored:
                    metrics.REFS_RESTORED.inc(restored)
            if written != -1:
                return
        raise DependencyUnavailable("redis", f"user {user_id!r} kept changing while loading")

    async def _read_state(self, user_id: str, windows: Windows) -> dict[str, Any]:
        """The user's state in PostgreSQL, in one statement (one snapshot): plan, credits,
        payment changes the credits already hold, usage of the open periods, and the first
        page of the debits whose idempotency keys may still live. The users asked for in
        the same tick of the event loop are read together (after Redis lost its data every
        user's first request loads it: one statement for many is far cheaper)."""
        # The ref window's start to the minute before (the margin covers it), so that the
        # loads of one moment share it.
        start = self._refs_window_start() // 60_000 * 60_000
        key = ((windows.period_id("d"), windows.period_id("m"), "n"), start)
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = self._wanted[key] = {}
            asyncio.get_running_loop().call_soon(self._read_states, key)
        future = wanted.get(user_id)
        if future is None:
            future = wanted[user_id] = asyncio.get_running_loop().create_future()
        return dict(await asyncio.shield(future))

    def _read_states(self, key: tuple[tuple[str, ...], int]) -> None:
        """Read the users of ``key`` gathered so far, at most ``LOAD_BATCH`` a statement."""
        wanted = self._wanted.pop(key, {})
        users = list(wanted)
        for i in range(0, len(users), LOAD_BATCH):
            batch = {u: wanted[u] for u in users[i : i + LOAD_BATCH]}
            task = asyncio.ensure_future(self._read_batch(key, batch))
            task.add_done_callback(_seen)

    async def _read_batch(self, key: tuple[tuple[str, ...], int],
                          wanted: dict[str, asyncio.Future[Any]]) -> None:
        periods, start_ms = key
        try:
            rows = await self.rt.db.fetch("user_load_state", list(wanted), list(periods),
                                          from_ms(start_ms), RESTORE_PAGE)
        except BaseException as exc:
            for future in wanted.values():
                if not future.done():
                    future.set_exception(exc)
            raise
        for row in rows:
            found = wanted.get(row["user_id"])
            if found is not None and not found.done():
                found.set_result(row)
        for user_id, future in wanted.items():  # one row per user: never left waiting
            if not future.done():
                future.set_exception(InvariantBroken(f"no load state read for {user_id!r}"))

    def _refs_window_start(self) -> int:
        """Where the ledger is read for idempotency keys to restore, epoch ms."""
        return (self.rt.clock.now_ms() - self.rt.settings.idempotency_ttl_seconds * 1000
                - RESTORE_CLOCK_MARGIN_MS)

    async def _write_state(self, user_id: str, user_key: str, generation: str,
                           windows: Windows, state: dict[str, Any]) -> tuple[int, int]:
        """Run load_user.lua with the state read (and its refs, one page at most): 1
        loaded, 0 loaded meanwhile, -1 a write-through changed the user since
        ``generation`` was read (read again); and the idempotency records it wrote."""
        rt = self.rt
        plan, credits, included = state["plan"], state["credits"], state["included"]
        usage = state["usage"]
        expires_ms = plan["expires_ms"] or 0 if plan else 0
        counters, lifetime = self._usage(user_id, usage, windows, expires_ms)
        # Nothing to hold (a read of a never-seen id): a short stay, so that reads of random
        # ids cost no lasting memory; a debit, credit or plan sets the full TTL.
        empty = (plan is None and not credits and not included and not usage
                 and not state["holds"])
        ttl_ms = rt.settings.unknown_user_ttl_seconds * 1000 if empty else rt.state_ttl_ms
        return await rt.scripts.load_user(
            user_key, generation=generation,
            plan_code=plan["plan_code"] if plan else rt.settings.default_plan,
            expires_ms=expires_ms, plan_version=plan["version"] if plan else 0,
            plan_start_ms=plan["start_ms"] if plan else 0, state_ttl_ms=ttl_ms,
            now=rt.clock.script_now(),
            credits=[(meter, max(0, balance)) for meter, balance in credits],
            lifetime=lifetime, included_outbox=included, counters=counters,
            holds=[(h[0], hold_record(h), h[11]) for h in state["holds"] if h[9] == "open"],
            refs_ttl_ms=rt.settings.idempotency_ttl_seconds * 1000,
            records=debit_records(user_id, state["refs"]),
        )

    async def _restore_hold_keys(self, user_id: str, holds: Sequence[list[Any]]) -> int:
        """Put back what Redis lost of the user's recent holds (``user_load_state``'s
        rows): a reserve's ref (a retry answers the same hold), a closed hold's result (a
        repeated settle or release answers it again)."""
        rt = self.rt
        ttl_ms = rt.settings.idempotency_ttl_seconds * 1000
        records: list[tuple[bytes, int, int]] = []
        keys: list[tuple[str, str, int]] = []
        for (hold_id, meter, units, ref, reason, _, _, remaining, _, state, created_ms, _,
             closed_ms, settled, fa, fc, closed_remaining, settle_tx) in holds:
            records.append((refs.hold_record(user_id, ref, hold_id, meter, units, reason),
                            max(0, remaining or 0), created_ms))
            if state != "open":
                settled = settled or 0
                result = (settled, fa or 0, fc or 0, closed_remaining or 0,
                          max(0, units - settled), settle_tx or "")
                marker = "\x1f".join([state[0], *map(str, result)])
                keys.append((f"{rt.keys.user(user_id)}:hd:{hold_id}", marker,
                             closed_ms + ttl_ms))
        return await rt.scripts.restore_refs(
            rt.keys.refs(user_id), now=rt.clock.script_now(), ttl_ms=ttl_ms, records=records,
            markers=keys)

    def _usage(self, user_id: str, usage: Sequence[Any], windows: Windows, expires_ms: int
               ) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]]]:
        """Flushed usage ([meter, period id, used] each) as period counters (key, used,
        expire-at ms: a cycle's ends with the plan) and lifetime usages (meter, used)."""
        grace_ms = self.rt.settings.counter_grace_seconds * 1000
        counters: list[tuple[str, int, int]] = []
        lifetime: list[tuple[str, int]] = []
        for meter, period_id, used in usage:
            kind, _, period = period_id.partition(":")
            if kind == "n":
                lifetime.append((meter, used))
                continue
            end_ms = expires_ms if kind == "y" else windows.period_end_ms(kind)
            counters.append((self.rt.keys.counter(user_id, meter, kind, period), used,
                             end_ms + grace_ms))
        return counters, lifetime

    async def restore_refs(self, user_id: str,
                           first_page: list[list[Any]] | None = None) -> int:
        """Put back the idempotency keys of the user's flushed debits still within their TTL
        (Redis may have lost them with the user's state), so that a retry of one answers
        DUPLICATE with its tx id and remaining instead of debiting again. Keys that exist
        are kept. The ledger is read a page at a time (the first may come with the load's
        read), each page restored by one short script call. Returns the keys written.

        The script judges each key's life on the clock that stamped the debits (Redis
        TIME); the ledger is read from ``RESTORE_CLOCK_MARGIN_MS`` earlier than this
        process's clock says the window starts, so that a clock running ahead loses no key."""
        rt = self.rt
        ttl_ms = rt.settings.idempotency_ttl_seconds * 1000
        after: tuple[datetime, uuid.UUID] = (from_ms(self._refs_window_start()),
                                             uuid.UUID(int=0))
        page = first_page
        written = 0
        while True:
            if page is None:
                page = [[r["ref"], str(r["tx_id"]), r["meter"], r["amount_micro"], r["reason"],
                         r["remaining_micro"], to_ms(r["occurred_at"]), r["occurred_at"]]
                        for r in await rt.db.fetch("user_recent_debits", user_id, *after,
                                                   RESTORE_PAGE)]
            written += await rt.scripts.restore_refs(
                rt.keys.refs(user_id), now=rt.clock.script_now(), ttl_ms=ttl_ms,
                records=debit_records(user_id, page))
            if len(page) < RESTORE_PAGE:
                break
            last_at = page[-1][7]
            after = (last_at if isinstance(last_at, datetime)
                     else datetime.fromisoformat(last_at), uuid.UUID(str(page[-1][1])))
            page = None
        if written:
            metrics.REFS_RESTORED.inc(written)
        return written
