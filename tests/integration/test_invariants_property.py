"""Random histories against the real Redis and PostgreSQL, checked against a model.

A hypothesis ``RuleBasedStateMachine`` drives debits (a small pool of users, meters, amounts
and refs, retries of earlier refs with the same and with other content), credits through
the API (repeated, reused), payments, the provider's notice of an API order and refunds
through the signed webhook (partial, full, beyond the payment, repeated), plan changes,
clock moves across day, month and plan-expiry boundaries, Redis losing a user's keys or
every key of the deployment (after a full flush, or before one), and reconciler restarts
(clean, or crashed after reading or after committing a batch). A Python model records what
the service acknowledged; after every step the users Redis holds must answer what the
model says, and after every full flush the PostgreSQL ledger must hold exactly what was
acknowledged (docs/architecture.md, "Invariants and where they are proved"):

1. no debit is accepted beyond what the model allows, and no meter goes below zero (the
   items of one batch run concurrently: their answers must be those of the items run one
   by one in some order);
2. one ref debits at most once: a retry answers 409 with the original tx_id and
   remaining, the same ref with other content 422;
3. after a flush every acknowledged debit, credit and refund is in the ledger exactly
   once (rows compared field by field, usage and credit balances too);
4. after Redis loses data, what it answers equals the model: nothing is reset for free;
   a loss before the flush loses exactly the debits not flushed yet (the write-behind
   window), as a whole, and their refs may be debited again;
5. every payment is credited exactly once (receipts, credit rows, refunds' wanted and
   taken), and every notification that could not be processed is kept as a dead letter.

Replay: hypothesis runs derandomized (a fixed seed), so a failure repeats on every run and
is shrunk to a minimal list of steps, printed with a ``@reproduce_failure`` blob.
``QG_PROPERTY_SEED=<n>`` explores another seed (printed with the test's output), and
``QG_PROPERTY_EXAMPLES`` runs more histories. No sleeps: the clock is a FixedClock, the
reconciler reads without blocking, and its claim and outbox ages are zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import os
import secrets
import zoneinfo
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from core.clock import FixedClock, to_ms
from core.settings import Settings
from reconciler.main import Reconciler
from tests.payment_support import (
    notification,
    payment_object,
    public_pem,
    refund_object,
    sign,
)
from tests.support import CREDIT, WEBHOOK, app_client

T = TypeVar("T")

ZONE_NAME = "Asia/Kolkata"  # UTC+05:30: local midnights are not UTC's
ZONE = zoneinfo.ZoneInfo(ZONE_NAME)
#: Three hours before a local month ends: day and month boundaries come early in a history.
T0 = to_ms(datetime(2026, 11, 30, 21, 0, tzinfo=ZONE))
MICRO = 1_000_000
MINUTE_MS = 60_000
DAY_MS = 86_400_000
#: The clock moves while it is this close to T0, and never further than LAST_MS: every ref
#: stays within its idempotency TTL (7 days), whether Redis kept its key or the ledger
#: restores it.
MAX_DRIFT_MS = 5 * DAY_MS
LAST_MS = T0 + 6 * DAY_MS
#: The shard of each user of a history: two share a stream and a catalog copy, one not.
USER_SHARDS = (0, 0, 1)
N_USERS = len(USER_SHARDS)
N_REFS = 10
DEFAULT_PLAN = "pfree"
#: plan code -> (duration days, price, {meter: (period, limit in units)}): periods day,
#: month, none and cycle (an allowance per assignment, for its duration); "pshort" names no
#: template meter (credits only) and lasts a day, so it expires within a history.
PLANS: dict[str, tuple[int | None, str, dict[str, tuple[str, int]]]] = {
    "pfree": (None, "0.00", {"chat": ("d", 2), "template": ("m", 1), "units": ("n", 1)}),
    "pday": (30, "30.00", {"chat": ("d", 4), "template": ("c", 2), "units": ("m", 3)}),
    "pshort": (1, "12.00", {"chat": ("c", 6), "units": ("n", 2)}),
}
PERIODS = {"d": "day", "m": "month", "n": "none", "c": "cycle"}
METERS = ("chat", "template", "units")
#: debit kind -> (meter, seed-000 action; None: the seed-002 balance API with a reason)
KINDS: dict[str, tuple[str, str | None]] = {
    "chat": ("chat", "chat_tokens"), "template": ("template", "tpl_run"), "units": ("units", None)}
SIGNER = ed25519.Ed25519PrivateKey.generate()
#: Full flushes tried before the streams must be empty (a crashed consumer's entries are
#: claimed once they are 1 ms idle).
FLUSH_ROUNDS = 50
#: The histories keep their keys (under their own prefixes) in this logical database of the
#: given Redis: losing "every key" SCANs it, and a shared database 0 may hold hundreds of
#: thousands of other tests' keys (a second per SCAN).
REDIS_DB = 12
#: Histories per run and steps per history (QG_PROPERTY_EXAMPLES runs more).
EXAMPLES, STEPS = 35, 40
#: How long hypothesis may shrink a failure, seconds.
SHRINK_SECONDS = 150

#: What the histories did, across all of them (printed at the end: the coverage).
SEEN: Counter[str] = Counter()

USERS = st.integers(0, N_USERS - 1)
REFS = st.integers(0, N_REFS - 1)
UNITS = st.sampled_from(["0.000001", "0.5", "1", "2", "3"])
REASONS = st.sampled_from(["", "pdf", "api"])
CREDIT_UNITS = st.sampled_from(["0", "1", "2.5", "4"])
PLAN_CODES = st.sampled_from(sorted(PLANS))
PAID = st.sampled_from(["0.03", "10.00", "25.50"])
#: Debits sent one after the other: (user, kind, units, ref, reason).
BURSTS = st.lists(st.tuples(USERS, st.sampled_from(sorted(KINDS)), UNITS, REFS, REASONS),
                  min_size=1, max_size=6)


def note(what: str) -> None:
    """Count an outcome for the summary the test prints."""
    SEEN[what] += 1


def micro(units: str | Decimal) -> int:
    """Units (text or exact Decimal) as micro-units."""
    return int(Decimal(units) * MICRO)


def period_id(period: str, now_ms: int) -> str:
    """The ledger's period id of a rule's period at a moment, computed in the model's own
    way (local date of ZONE)."""
    local = datetime.fromtimestamp(now_ms / 1000, ZONE)
    if period == "d":
        return f"d:{local.date().isoformat()}"
    if period == "m":
        return f"m:{local:%Y-%m}"
    return "n"


def own_database(redis_url: str) -> str:
    """``redis_url`` with REDIS_DB as its logical database."""
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"]
        return urlunsplit(parts._replace(query=urlencode([*query, ("db", str(REDIS_DB))])))
    return urlunsplit(parts._replace(path=f"/{REDIS_DB}"))


def cents_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# -- the model: what the service acknowledged -----------------------------------------------

@dataclass
class UserState:
    """One user as the model knows it."""

    plan: str | None = None  # assigned plan; None: never assigned (the default)
    exp: int = 0  # ms, 0: never
    start: int = 0  # when the assignment began, ms
    version: int = 0  # the assignment's user_plans.version: its cycle's id
    assignment: int = 0  # which model assignment is in force (a refund ends only its own)
    credits: Counter[str] = field(default_factory=Counter)
    usage: Counter[tuple[str, str]] = field(default_factory=Counter)  # (meter, period id)


@dataclass(frozen=True)
class View:
    """A meter as the model expects check_many.lua to show it (micro-units)."""

    period: str
    limit: int
    used: int
    credits: int
    allowance: int
    period_id: str
    plan: str

    @property
    def remaining(self) -> int:
        return self.allowance + self.credits


@dataclass(eq=False)
class Debit:
    """An acknowledged debit (200), as sent and as answered."""

    user: str
    kind: str
    units: str
    ref: str
    reason: str
    meter: str
    amount: int
    tx_id: str
    remaining: int
    from_allowance: int
    from_credits: int
    period_id: str
    plan: str
    at_ms: int
    flushed: bool = False  # committed in PostgreSQL
    lost: bool = False  # lost with Redis before it was flushed (the write-behind window)

    def __repr__(self) -> str:
        return f"Debit({self.user}, {self.kind} {self.units}, ref={self.ref!r})"


@dataclass(eq=False)
class Order:
    """A credited order (API or webhook): what it bought and what was refunded of it."""

    order_id: str
    user: str
    plan: str
    units: tuple[str, str]  # units_chat, units_tpl as sent
    credits: dict[str, int]
    cents: int
    tx_id: str
    assignment: int
    payment_id: str | None = None
    notice: bytes = b""  # the payment.succeeded body, for repeats
    refunds: list[Refund] = field(default_factory=list)

    @property
    def refunded_cents(self) -> int:
        return sum(r.cents for r in self.refunds)

    def __repr__(self) -> str:
        return f"Order({self.order_id}, {self.user}, {self.plan}, paid={self.payment_id})"


@dataclass(eq=False)
class Refund:
    """An accepted refund."""

    refund_id: str
    order: Order
    cents: int
    wanted: dict[str, int]
    taken: dict[str, int]
    revoked: bool
    body: bytes

    def __repr__(self) -> str:
        return f"Refund({self.refund_id}, {cents_text(self.cents)} of {self.order.order_id})"


class Model:
    """What the service acknowledged, and so what it must answer and record."""

    def __init__(self, users: list[str]) -> None:
        self.users = {u: UserState() for u in users}
        self.debits: list[Debit] = []
        self.refs: dict[tuple[str, str], Debit] = {}
        self.orders: dict[str, Order] = {}
        self.refunds: list[Refund] = []
        self.plan_rows: Counter[tuple[str, str, str | None]] = Counter()
        self.assignments = 0
        self.dead_letters = 0
        self.lost = 0

    def in_force(self, user: str, now: int) -> tuple[str, str, str, int]:
        """The plan in force, its status, the assigned plan and its expiry."""
        state = self.users[user]
        assigned = state.plan or DEFAULT_PLAN
        if state.exp and now >= state.exp:
            return DEFAULT_PLAN, "expired", assigned, state.exp
        return assigned, "active", assigned, state.exp

    def view(self, user: str, meter: str, now: int) -> View:
        state = self.users[user]
        code = self.in_force(user, now)[0]
        period, limit_units = PLANS[code][2].get(meter, ("n", 0))
        limit = limit_units * MICRO
        # A cycle is the assignment's own (every assignment began after the plans were
        # written, so none counts by month as before a switch to cycle).
        pid = f"y:{state.version}" if period == "c" else period_id(period, now)
        used = state.usage[(meter, pid)]
        credits = state.credits[meter]
        return View(period, limit, used, credits, max(0, limit - used), pid, code)

    def assign(self, user: str, plan: str, now: int, reason: str | None) -> int:
        """A plan assignment written through (plan apply, a credit's purchase)."""
        duration = PLANS[plan][0]
        state = self.users[user]
        state.plan, state.exp = plan, now + duration * DAY_MS if duration else 0
        state.start = now
        self.assignments += 1
        state.assignment = self.assignments
        self.plan_rows[(user, plan, reason)] += 1
        return state.assignment

    def accept(self, debit: Debit) -> None:
        state = self.users[debit.user]
        state.usage[(debit.meter, debit.period_id)] += debit.from_allowance
        state.credits[debit.meter] -= debit.from_credits
        self.debits.append(debit)
        self.refs[(debit.user, debit.ref)] = debit

    def save(self) -> tuple[Any, ...]:
        """What ``accept`` changes, to try debits and take them back (``restore``)."""
        return copy.deepcopy(self.users), list(self.debits), dict(self.refs)

    def restore(self, saved: tuple[Any, ...]) -> None:
        self.users, self.debits, self.refs = copy.deepcopy(saved[0]), list(saved[1]), \
            dict(saved[2])

    def flushed(self, tx_ids: set[str] | None = None) -> None:
        """Debits now committed in PostgreSQL (None: every one acknowledged)."""
        for debit in self.debits:
            if not debit.lost and (tx_ids is None or debit.tx_id in tx_ids):
                debit.flushed = True

    def lose_unflushed(self) -> int:
        """Redis lost its streams: the debits not flushed yet are gone as a whole (their
        usage, the credits they took, their refs). Returns how many."""
        lost = 0
        for debit in self.debits:
            if debit.flushed or debit.lost:
                continue
            debit.lost = True
            lost += 1
            state = self.users[debit.user]
            state.usage[(debit.meter, debit.period_id)] -= debit.from_allowance
            state.credits[debit.meter] += debit.from_credits
            if self.refs.get((debit.user, debit.ref)) is debit:
                del self.refs[(debit.user, debit.ref)]
        self.lost += lost
        return lost

    def expected_ledger(self) -> Counter[tuple[Any, ...]]:
        """Every ledger row the database must hold, projected per kind."""
        rows: Counter[tuple[Any, ...]] = Counter()
        for d in self.debits:
            if not d.lost:
                rows[("debit", d.user, d.meter, -d.amount, d.from_allowance, d.from_credits,
                      d.period_id, d.ref, d.reason, d.plan, d.remaining, d.at_ms, d.tx_id)] += 1
        for order in self.orders.values():
            for meter, amount in order.credits.items():
                rows[("credit", order.user, meter, amount, order.order_id)] += 1
        for r in self.refunds:
            for meter, wanted in r.wanted.items():
                if wanted > 0:
                    rows[("refund", r.order.user, meter, -r.taken[meter], r.refund_id,
                          f"wanted={wanted}")] += 1
        for (user, plan, reason), n in self.plan_rows.items():
            rows[("plan", user, plan, reason)] += n
        return rows


def ledger_row(row: asyncpg.Record) -> tuple[Any, ...]:
    """A ledger row projected like ``Model.expected_ledger``."""
    kind, user, meter = row["kind"], row["user_id"], row["meter"]
    if kind == "debit":
        return (kind, user, meter, row["amount_micro"], row["from_allowance_micro"],
                row["from_credits_micro"], row["period_id"], row["ref"], row["reason"] or "",
                row["plan_code"], row["remaining_micro"], to_ms(row["occurred_at"]),
                row["tx"])
    if kind == "credit":
        return (kind, user, meter, row["amount_micro"], row["ref"])
    if kind == "refund":
        return (kind, user, meter, row["amount_micro"], row["ref"], row["reason"])
    return (kind, user, row["plan_code"], row["reason"])


def differ(what: str, expected: Counter[Any] | dict[Any, Any],
           actual: Counter[Any] | dict[Any, Any]) -> str:
    """A readable difference of two collections."""
    if isinstance(expected, Counter) and isinstance(actual, Counter):
        missing, extra = expected - actual, actual - expected
        return f"{what}: missing {sorted(missing.items(), key=repr)}, " \
               f"unexpected {sorted(extra.items(), key=repr)}"
    keys = sorted(set(expected) | set(actual), key=repr)
    return f"{what}: " + ", ".join(f"{k}: expected {expected.get(k)}, got {actual.get(k)}"
                                   for k in keys if expected.get(k) != actual.get(k))


def json_decimal(response: httpx.Response) -> dict[str, Any]:
    """A response body with every number as an exact Decimal."""
    body: dict[str, Any] = json.loads(response.text, parse_float=Decimal, parse_int=Decimal)
    return body


def quote_units(body: dict[str, Any], units: str) -> str:
    """JSON text of ``body`` with ``units`` as a number spelled exactly as given."""
    return json.dumps({**body, "units": "@units@"}).replace('"@units@"', units)


# -- the machine ----------------------------------------------------------------------------

class Servers(Protocol):
    """What the machine needs of the session's servers (tests/conftest.py)."""

    redis_url: str


@dataclass
class Context:
    """What the histories of one test share: the servers and a database of the test's own
    (each history has its own users, key prefix, engine and event loop)."""

    redis_url: str
    db_dsn: str
    plans_ready: bool = False


class InvariantsMachine(RuleBasedStateMachine):
    """One history: its own users, key prefix, app, engine, clock and reconciler, all on an
    event loop of its own (pytest-asyncio's session loop is not shared), on the test's
    database; what it checks there is scoped to its users."""

    debits = Bundle("debits")
    orders = Bundle("orders")  # credited through the API
    payments = Bundle("payments")  # credited with a payment id: refundable
    refunds = Bundle("refunds")

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        self.token = secrets.token_hex(4)
        self.clock = FixedClock(T0)
        self.ids = itertools.count()
        self.stack = contextlib.AsyncExitStack()
        self.context = context
        self.reconcilers: list[Reconciler] = []
        try:
            self.run(self._start())
        except BaseException:
            self.teardown()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    async def _start(self) -> None:
        self.settings = Settings(
            env="test", redis_url=self.context.redis_url, key_prefix=f"qgp{self.token}",
            db_dsn=self.context.db_dsn, n_shards=4,
            timezone=ZONE_NAME, default_plan=DEFAULT_PLAN, flush_block_ms=1,
            flush_claim_idle_ms=1, redis_timeout_seconds=5.0, db_timeout_seconds=10.0,
            webhook_public_key=public_pem(SIGNER))
        self.redis = aioredis.Redis.from_url(self.context.redis_url, decode_responses=True)
        self.stack.push_async_callback(self.redis.aclose)
        self.http = await self.stack.enter_async_context(app_client(self.settings, self.clock))
        self.engine = self.http.engine  # type: ignore[attr-defined]
        self.users = [next(u for k in itertools.count()
                           if self.engine.keys.shard(u := f"pu{i}-{self.token}-{k}") == shard)
                      for i, shard in enumerate(USER_SHARDS)]
        self.model = Model(self.users)
        for code in (DEFAULT_PLAN, *(p for p in PLANS if p != DEFAULT_PLAN)):
            if self.context.plans_ready:
                break
            duration, price, meters = PLANS[code]
            response = await self.http.put(f"/internal/billing/plans/{code}", json={
                "meters": {m: {"limit": limit, "period": PERIODS[period]}
                           for m, (period, limit) in meters.items()},
                "duration_days": duration, "price": price, "currency": "RUB"})
            assert response.status_code == 200, response.text
        self.context.plans_ready = True
        self.reconciler = self._new_reconciler()
        async with self.engine.db.connection() as conn:  # what earlier histories left
            self.before = await conn.fetchrow(
                "SELECT (SELECT coalesce(max(id), 0) FROM dead_letters) AS dead_letter,"
                " (SELECT coalesce(max(id), 0) FROM poison_events) AS poison")

    def teardown(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.runner.close()

    async def _stop(self) -> None:
        try:
            if hasattr(self, "redis"):
                keys = [k async for k in self.redis.scan_iter(
                    match=f"{self.settings.key_prefix}:*", count=1000)]
                if keys:
                    await self.redis.unlink(*keys)
        finally:
            await self.stack.aclose()

    def _new_reconciler(self) -> Reconciler:
        reconciler = Reconciler(self.engine, self.redis, name=f"prop-{next(self.ids)}")
        reconciler.outbox_min_age = timedelta(0)  # no request is in flight: no waiting
        # Reads leave BLOCK out: an empty stream answers at once (a BLOCK of 1 ms lasts a
        # server tick, 100 ms at Redis' default hz, and a drain ends on two empty reads).
        reconciler.consumer.block_ms = None  # type: ignore[assignment]
        self.reconcilers.append(reconciler)
        return reconciler

    def _assignment_time(self) -> int:
        """The time of a plan assignment: now (two assignments of a user in one millisecond
        are two cycles: a cycle is the assignment's version)."""
        return self.clock.now_ms()

    async def _version(self, user: str) -> int:
        """The user's current plan assignment's version in PostgreSQL (its cycle's id)."""
        async with self.engine.db.connection() as conn:
            version: int = await conn.fetchval(
                "SELECT version FROM user_plans WHERE user_id = $1", user)
        return version

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{self.token}-{next(self.ids)}"

    # -- debits ----------------------------------------------------------------------------
    @rule(target=debits, burst=BURSTS, batched=st.booleans())
    def debit(self, burst: list[tuple[int, str, str, int, str]], batched: bool) -> Any:
        """Debits, one after the other, each (user, kind, units, ref, reason) of a small
        pool (refs are shared: the same ref of another user is another debit). ``batched``:
        consecutive seed-000 debits go as one POST /quota/debit/batch, whose items are
        answered as single debits would be."""
        items = [(self.users[user], kind, units, f"r{ref}", reason if kind == "units" else "")
                 for user, kind, units, ref, reason in burst]
        return multiple(*self.run(self._burst(items, batched)))

    #: Hypothesis picks among the enabled rules alike; debits are what most invariants are
    #: about, so a second rule sends them too.
    more_debits = rule(target=debits, burst=BURSTS, batched=st.booleans())(
        debit.__wrapped__)  # type: ignore[attr-defined]

    @rule(original=debits, change=st.sampled_from(["same", "amount", "meter", "reason"]))
    def retry(self, original: Debit, change: str) -> None:
        """An earlier acknowledged debit sent again, as it was or with other content."""
        kind, units, reason = original.kind, original.units, original.reason
        if change == "meter":
            kind = {"chat": "template", "template": "chat", "units": "chat"}[kind]
            reason = "" if KINDS[kind][1] else reason
        elif change == "reason" and kind == "units":
            reason += "-again"
        elif change != "same":
            units = str(Decimal(units) + 1)
        note(f"retry with {change} content")
        self.run(self._burst([(original.user, kind, units, original.ref, reason)], False))

    async def _burst(self, items: list[tuple[str, str, str, str, str]], batched: bool
                     ) -> list[Debit]:
        """Send the debits in order and judge every answer; the ones accepted."""
        accepted, i = [], 0
        while i < len(items):
            j = i + 1
            if batched and KINDS[items[i][1]][1]:
                while j < len(items) and KINDS[items[j][1]][1]:
                    j += 1
                response = await self.http.post(
                    "/internal/billing/quota/debit/batch",
                    content='{"items": [%s]}' % ", ".join(  # noqa: UP031
                        quote_units({"user_id": u, "action": KINDS[k][1], "ref": r}, n)
                        for u, k, n, r, _ in items[i:j]),
                    headers={"Content-Type": "application/json"})
                assert response.status_code == 200, response.text
                answers = [(a["status"], a["body"]) for a in json_decimal(response)["results"]]
                assert len(answers) == j - i, response.text
            else:
                answers = [await self._send(*items[i])]
            accepted += self._judge_all(items[i:j], answers)
            i = j
        return accepted

    def _judge_all(self, items: list[tuple[str, str, str, str, str]],
                   answers: list[tuple[int, dict[str, Any]]]) -> list[Debit]:
        """Judge the answers to debits sent together (a batch's items run concurrently):
        they must be what the items answer run one by one in some order, in their own
        order if it fits; the debits accepted."""
        for status, _ in answers:
            note(f"debit answered {status}" + (" in a batch" if len(items) > 1 else ""))
        saved = self.model.save()
        first_error = None
        for order in itertools.permutations(range(len(items))):
            try:
                found = [self._judge(*items[k], *answers[k]) for k in order]
            except AssertionError as exc:
                first_error = first_error or exc
                self.model.restore(saved)
                continue
            if list(order) != sorted(order):
                note("batch answered as if its items ran in another order")
            accepted = [d for d in found if d is not None]
            for d in accepted:
                note(f"debit of a {PERIODS[d.period_id[0].replace('y', 'c')]} meter paid by "
                     + ("allowance" if d.from_credits == 0 else
                        "credits" if d.from_allowance == 0 else "both"))
            return accepted
        assert first_error is not None
        raise first_error

    async def _send(self, user: str, kind: str, units: str, ref: str, reason: str
                    ) -> tuple[int, dict[str, Any]]:
        """One debit by the seed-000 or (for the units meter) the seed-002 API."""
        action = KINDS[kind][1]
        if action:
            body = quote_units({"user_id": user, "action": action, "ref": ref}, units)
            path = "/internal/billing/quota/debit"
        else:
            body = quote_units({"user_id": user, "ref": ref, "reason": reason}, units)
            path = "/internal/billing/debit"
        response = await self.http.post(path, content=body,
                                        headers={"Content-Type": "application/json"})
        return response.status_code, json_decimal(response)

    def _judge(self, user: str, kind: str, units: str, ref: str, reason: str, status: int,
               got: dict[str, Any]) -> Debit | None:
        """Check a debit's answer against the model (invariants 1 and 2); the debit when
        it was accepted, which the model then holds."""
        meter, action = KINDS[kind]
        amount, now = micro(units), self.clock.now_ms()
        field_ = "remaining" if action else "balance"
        what = f"debit of {units} {meter} by {user} with ref {ref!r} (reason {reason!r})"
        prior = self.model.refs.get((user, ref))
        if prior is not None:  # invariant 2
            if (prior.meter, prior.amount, prior.reason) == (meter, amount, reason):
                assert status == 409, f"{what}: a retry of {prior}: {status} {got}"
                assert (got["tx_id"], micro(got[field_])) == (prior.tx_id, prior.remaining), (
                    f"{what}: a retry must answer the original tx_id {prior.tx_id} and "
                    f"remaining {prior.remaining}: {got}")
            else:
                assert status == 422, f"{what}: reuses {prior}: {status} {got}"
                assert got["error"]["code"] == "ref_reused", got
            return None
        view = self.model.view(user, meter, now)
        if amount > view.remaining:  # invariant 1
            assert status == 403, (
                f"{what}: only {view.remaining} micro-units remain ({view}): {status} {got}")
            assert micro(got[field_]) == view.remaining, (what, view, got)
            return None
        assert status == 200, f"{what}: {view.remaining} remain ({view}): {status} {got}"
        from_allowance = min(amount, view.allowance)
        debit = Debit(user, kind, units, ref, reason, meter, amount, got["tx_id"],
                      view.remaining - amount, from_allowance, amount - from_allowance,
                      view.period_id, view.plan, now)
        assert micro(got[field_]) == debit.remaining, (what, view, got)
        if action:
            assert (micro(got["from_allowance"]), micro(got["from_credits"]),
                    got["plan_code"]) == (debit.from_allowance, debit.from_credits,
                                          view.plan), (what, view, got)
        self.model.accept(debit)
        return debit

    # -- credits and payments --------------------------------------------------------------
    @rule(target=orders, user=USERS, plan=PLAN_CODES, chat=CREDIT_UNITS, tpl=CREDIT_UNITS)
    def credit(self, user: int, plan: str, chat: str, tpl: str) -> Order:
        """POST /quota/credit of a new order: the plan bought and credits."""
        return self.run(self._credit(self.users[user], plan, (chat, tpl)))

    async def _credit(self, user: str, plan: str, units: tuple[str, str]) -> Order:
        order_id, now = self._new_id("o"), self._assignment_time()
        response = await self.http.post(CREDIT, json={
            "order_id": order_id, "user_id": user, "plan_code": plan,
            "units_chat": units[0], "units_tpl": units[1]})
        assert response.status_code == 200, response.text
        order = self._credited(order_id, user, plan, units, micro(PLANS[plan][1]) // 10_000,
                               response.json()["tx_id"], now)
        self.model.users[user].version = await self._version(user)
        assert response.json()["credits"] == {
            m: float(Decimal(v) / MICRO) for m, v in order.credits.items()}, response.text
        return order

    def _credited(self, order_id: str, user: str, plan: str, units: tuple[str, str],
                  cents: int, tx_id: str, now: int) -> Order:
        """The model of a new credited order."""
        credits = {m: micro(u) for m, u in zip(("chat", "template"), units, strict=True)
                   if micro(u) > 0}
        assignment = self.model.assign(user, plan, now, f"order {order_id}")
        for meter, amount in credits.items():
            self.model.users[user].credits[meter] += amount
        order = Order(order_id, user, plan, units, credits, cents, tx_id, assignment)
        self.model.orders[order_id] = order
        return order

    @rule(order=orders, change=st.sampled_from(["same", "units", "user", "plan"]))
    def repeat_credit(self, order: Order, change: str) -> None:
        """The same order id again: 409 with the first result, or 422 with other content;
        nothing is credited twice."""
        body = {"order_id": order.order_id, "user_id": order.user, "plan_code": order.plan,
                "units_chat": order.units[0], "units_tpl": order.units[1]}
        if change == "units":
            body["units_chat"] = str(Decimal(order.units[0]) + 1)
        elif change == "user":
            body["user_id"] = next(u for u in self.users if u != order.user)
        elif change == "plan":
            body["plan_code"] = next(p for p in sorted(PLANS) if p != order.plan)
        response = self.run(self.http.post(CREDIT, json=body))
        if change == "same":
            assert response.status_code == 409, response.text
            assert response.json()["tx_id"] == order.tx_id, (order, response.text)
        else:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "order_reused", response.text

    async def _notify(self, body: bytes) -> httpx.Response:
        return await self.http.post(WEBHOOK, content=body, headers={
            "Content-Type": "application/json", "X-Signature": sign(SIGNER, body)})

    @rule(target=payments, user=USERS, plan=PLAN_CODES, chat=CREDIT_UNITS, tpl=CREDIT_UNITS,
          paid=PAID)
    def pay(self, user: int, plan: str, chat: str, tpl: str, paid: str) -> Order:
        """A signed payment.succeeded: credited once, by its payment id."""
        payment, now = self._new_id("pay"), self._assignment_time()
        body = notification("payment.succeeded", payment_object(
            payment, self.users[user], plan, amount=paid, units_chat=chat, units_tpl=tpl))
        response = self.run(self._notify(body))
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "processed", response.text
        order = self._credited(payment, self.users[user], plan, (chat, tpl),
                               micro(paid) // 10_000, "", now)
        self.model.users[self.users[user]].version = self.run(self._version(self.users[user]))
        order.payment_id, order.notice = payment, body
        return order

    @rule(order=payments)
    def repeat_payment(self, order: Order) -> None:
        """A payment notification delivered again: 200 duplicate, nothing credited."""
        response = self.run(self._notify(order.notice))
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "duplicate", response.text

    @rule(target=payments, order=orders)
    def provider_notice(self, order: Order) -> Any:
        """The provider's payment.succeeded for an order Pay-svc credited through the API
        (metadata.order_id): they meet at one receipt and credit once; the payment id is
        attached, so it can be refunded. A second payment of that order is a dead letter."""
        payment = self._new_id("pay")
        body = notification("payment.succeeded", payment_object(
            payment, order.user, order.plan, amount=PLANS[order.plan][1],
            units_chat=order.units[0], units_tpl=order.units[1], order_id=order.order_id))
        response = self.run(self._notify(body))
        if order.payment_id is not None:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "order_reused", response.text
            self.model.dead_letters += 1
            return multiple()
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "duplicate", response.text
        order.payment_id, order.notice = payment, body
        return order

    @rule(target=refunds, order=payments,
          share=st.sampled_from(["cent", "third", "half", "rest", "beyond"]))
    def refund(self, order: Order, share: str) -> Any:
        """A signed refund.succeeded of part or all of a payment (or beyond it: a dead
        letter). Credits come back in proportion, never below zero; the refund that
        completes the payment ends the plan it bought if that is still the user's."""
        paid, left = order.cents, order.cents - order.refunded_cents
        cents = {"cent": 1, "third": paid // 3, "half": paid // 2, "rest": left,
                 "beyond": left + 1}[share]
        refund_id = self._new_id("rf")
        body = notification("refund.succeeded", refund_object(
            refund_id, order.payment_id or "", cents_text(cents)))
        response = self.run(self._notify(body))
        if cents <= 0 or cents > left:
            assert response.status_code == 422, response.text
            code = "invalid_notification" if cents <= 0 else "refund_exceeds_payment"
            assert response.json()["error"]["code"] == code, response.text
            self.model.dead_letters += 1
            return multiple()
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "processed", response.text
        return self._refunded(order, refund_id, cents, body)

    def _refunded(self, order: Order, refund_id: str, cents: int, body: bytes) -> Refund:
        """The model of an accepted refund."""
        complete = order.refunded_cents + cents == order.cents
        user = self.model.users[order.user]
        wanted, taken = {}, {}
        for meter, total in sorted(order.credits.items()):
            before = sum(r.wanted.get(meter, 0) for r in order.refunds)
            wanted[meter] = total - before if complete else total * cents // order.cents
            if wanted[meter] > 0:
                taken[meter] = min(wanted[meter], max(0, user.credits[meter]))
                user.credits[meter] -= taken[meter]
        revoked = complete and user.assignment == order.assignment
        note(f"refund: complete={complete}, revokes={revoked}, short="
              f"{any(taken[m] < wanted[m] for m in taken)}")
        if revoked:
            now = self.clock.now_ms()
            self.model.assignments += 1
            user.exp, user.assignment = now, self.model.assignments
            self.model.plan_rows[(order.user, order.plan, f"refund {refund_id}")] += 1
        refund = Refund(refund_id, order, cents, wanted, taken, revoked, body)
        order.refunds.append(refund)
        self.model.refunds.append(refund)
        return refund

    @rule(refund=refunds, same=st.booleans())
    def repeat_refund(self, refund: Refund, same: bool) -> None:
        """A refund delivered again: 200 duplicate; its id with another amount: a dead
        letter (refund_reused). Nothing is taken back twice."""
        body = refund.body
        if not same:
            body = notification("refund.succeeded", refund_object(
                refund.refund_id, refund.order.payment_id or "", cents_text(refund.cents + 1)))
        response = self.run(self._notify(body))
        if same:
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "duplicate", response.text
        else:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "refund_reused", response.text
            self.model.dead_letters += 1

    # -- plans and time --------------------------------------------------------------------
    @rule(user=USERS, plan=PLAN_CODES)
    def apply_plan(self, user: int, plan: str) -> None:
        """POST /plan/apply: the plan for its duration from now."""
        now = self._assignment_time()
        response = self.run(self.http.post("/internal/billing/plan/apply", json={
            "user_id": self.users[user], "plan_code": plan}))
        assert response.status_code == 200, response.text
        self.model.assign(self.users[user], plan, now, None)
        self.model.users[self.users[user]].version = self.run(self._version(self.users[user]))

    @precondition(lambda self: self.clock.now_ms() - T0 < MAX_DRIFT_MS)
    @rule(step=st.sampled_from(["minute", "5h", "day", "before_midnight", "midnight",
                                "plan_expiry"]))
    def advance_clock(self, step: str) -> None:
        """Move the clock: a little, to the last ms of the local day, to its midnight, or
        to the moment a user's plan expires."""
        now = self.clock.now_ms()
        local = datetime.fromtimestamp(now / 1000, ZONE)
        midnight = to_ms(datetime.combine(local.date() + timedelta(days=1),
                                          datetime.min.time(), ZONE))
        expiries = [s.exp for s in self.model.users.values() if s.exp > now]
        target = {"minute": now + MINUTE_MS, "5h": now + 5 * 3_600_000, "day": now + DAY_MS,
                  "before_midnight": max(now, midnight - 1), "midnight": midnight,
                  "plan_expiry": min(expiries, default=now + MINUTE_MS)}[step]
        before = (period_id("d", now), period_id("m", now))
        target = min(target, LAST_MS)
        self.clock.set(target)
        note(f"clock moved ({step}): " + ", ".join(
            kind for kind, a, b in zip(("new day", "new month"), before,
                                       (period_id("d", target), period_id("m", target)),
                                       strict=True) if a != b))

    # -- Redis losing data, the reconciler -------------------------------------------------
    @rule(lost=st.one_of(st.just("everything"), USERS), flush_first=st.booleans(),
          read_back=st.booleans())
    def lose_redis_data(self, lost: str | int, flush_first: bool, read_back: bool) -> None:
        """Redis loses one user's keys (state, counters, refs), always after a full flush,
        or every key of the deployment (with the catalog copies, the streams and their
        groups), after a full flush or before one. After a flush nothing may be lost or
        reset; before one, exactly the debits not flushed yet are (the write-behind
        window). ``read_back``: the users are read (and so rebuilt) at once.

        One user's keys lost while its events wait in a surviving stream is what eviction
        does, which noeviction rules out (docs/architecture.md, "Missing state is not zero
        usage"): the rebuild then misses their usage and refs, so it is not drawn."""
        if flush_first or lost != "everything":
            self.run(self._flush_all())
        if lost == "everything":
            patterns, users = [f"{self.settings.key_prefix}:*"], self.users
            note(f"Redis lost everything with {self.model.lose_unflushed()} debits unflushed")
        else:
            users = [self.users[int(lost)]]
            base = self.engine.keys.user(users[0])
            patterns = [base, f"{base}:*"]  # not the keys of a user whose id extends it
            note("Redis lost a user's keys")

        async def wipe() -> None:
            keys = [k for p in patterns async for k in self.redis.scan_iter(match=p, count=1000)]
            if keys:
                await self.redis.delete(*keys)
            for user in users if read_back else ():
                await self._check_via_api(user)

        self.run(wipe())

    @rule(restart=st.sampled_from(["no", "clean", "crashed_after_read",
                                   "crashed_after_commit"]), drain=st.booleans())
    def reconcile(self, restart: str, drain: bool) -> None:
        """A full flush by the running reconciler, or a new reconciler process (another
        consumer name), optionally flushing at once. The old one may have crashed with a
        batch read but not written, or written but not acknowledged: the new one claims
        the batch and writes it once. After a flush the ledger must hold exactly what was
        acknowledged."""
        if restart.startswith("crashed"):
            held = self.run(self._crash(restart.endswith("commit")))
            note(f"reconciler {restart} with {min(held, 3)}{'+' if held > 3 else ''} entries")
        if restart != "no":
            self.reconciler = self._new_reconciler()
        if drain or restart == "no":
            self.run(self._flush_all())

    async def _crash(self, commit: bool) -> int:
        consumer = self.reconciler.consumer
        await consumer.ensure_groups()
        entries = await consumer.claim() or await consumer.read()
        if commit and entries:
            await self.reconciler.writer.write(entries)
            self.model.flushed({e.fields["e"].split("\x1f")[2] for e in entries})
        return len(entries)

    async def _backlog(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.engine.keys.all_ledgers():
            pipe.xlen(stream)
        return sum(await pipe.execute())

    async def _flush_all(self) -> None:
        for _ in range(FLUSH_ROUNDS):
            self.reconciler._next_claim = 0.0  # take over a crashed consumer's entries
            await self.reconciler.drain()
            if await self._backlog() == 0:
                break
        else:
            raise AssertionError(f"streams not empty after {FLUSH_ROUNDS} drains")
        self.model.flushed()
        await self._verify_ledger()

    # -- checks ----------------------------------------------------------------------------
    @rule(user=USERS)
    def check_via_api(self, user: int) -> None:
        """GET /quota/check (loads a user Redis does not hold) agrees with the model."""
        self.run(self._check_via_api(self.users[user]))

    async def _check_via_api(self, user: str) -> None:
        response = await self.http.get(f"/internal/billing/quota/check/{user}")
        assert response.status_code == 200, response.text
        got, now = json_decimal(response), self.clock.now_ms()
        code, status, assigned, exp = self.model.in_force(user, now)
        shown_exp = to_ms(datetime.fromisoformat(got["expires_at"])) if got["expires_at"] else 0
        assert (got["plan_code"], got["plan_status"], got["assigned_plan"], shown_exp) == (
            code, status, assigned, exp // 1000 * 1000), (user, got)  # shown in seconds
        for meter in METERS:
            view, shown = self.model.view(user, meter, now), got["meters"][meter]
            assert (shown["period"], micro(shown["limit"]), micro(shown["used"]),
                    micro(shown["credits"]), micro(shown["remaining"])) == (
                PERIODS[view.period], view.limit, view.used, view.credits, view.remaining), (
                f"{user} {meter} after Redis rebuilt it: expected {view}, got {shown}")

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        """Every user Redis holds answers the model's plan, usage, credits and remaining,
        none below zero (users not in Redis are compared when they are loaded)."""
        self.run(self._compare_redis())

    async def _compare_redis(self) -> None:
        await asyncio.gather(*(self._compare_user(user) for user in self.users))

    async def _compare_user(self, user: str) -> None:
        if not await self.redis.hexists(self.engine.keys.user(user), "loaded"):
            return
        reply = await self.engine.check(user, list(METERS))
        now = self.clock.now_ms()
        assert (reply.plan_code, reply.plan_status, reply.assigned_plan,
                reply.expires_ms) == self.model.in_force(user, now), (user, reply)
        for got in reply.meters:
            view = self.model.view(user, got.meter, now)
            assert got.remaining >= 0 and got.credits >= 0, (user, got)
            assert (got.period, got.limit, got.used, got.credits, got.remaining) == (
                view.period, view.limit, view.used, view.credits, view.remaining), (
                f"{user} {got.meter}: Redis {got}, model {view}")

    async def _verify_ledger(self) -> None:
        """After a full flush: the ledger, usage, balances, receipts and refunds hold exactly
        what was acknowledged, once each (invariants 3 and 5)."""
        users, before = self.users, self.before
        async with self.engine.db.connection() as conn:
            ledger = await conn.fetch(
                "SELECT tx_id::text AS tx, kind, user_id, meter, amount_micro, "
                "from_allowance_micro, from_credits_micro, period_id, ref, reason, plan_code, "
                "remaining_micro, occurred_at FROM ledger WHERE user_id = ANY($1)", users)
            usage = await conn.fetch("SELECT user_id, meter, period_id, used_micro FROM "
                                     "usage_counters WHERE user_id = ANY($1)", users)
            balances = await conn.fetch("SELECT user_id, meter, balance_micro FROM "
                                        "credit_balances WHERE user_id = ANY($1)", users)
            receipts = await conn.fetch("SELECT order_id, payment_id, user_id, plan_code, "
                                        "status, credits, amount FROM payment_receipts "
                                        "WHERE user_id = ANY($1)", users)
            refunds = await conn.fetch(
                "SELECT f.refund_id, f.order_id, f.wanted, f.taken, f.plan_revoked "
                "FROM payment_refunds f JOIN payment_receipts r USING (order_id) "
                "WHERE r.user_id = ANY($1)", users)
            counts = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM redis_outbox WHERE applied_at IS NULL"
                "        AND user_id = ANY($1)) AS pending,"
                " (SELECT count(*) FROM poison_events WHERE id > $2) AS poison,"
                " (SELECT count(*) FROM dead_letters WHERE id > $3) AS dead_letters",
                users, before["poison"], before["dead_letter"])
        model = self.model
        expected, actual = model.expected_ledger(), Counter(ledger_row(r) for r in ledger)
        assert actual == expected, differ("ledger", expected, actual)
        want_usage = {(u, m, p): v for u, s in model.users.items()
                      for (m, p), v in s.usage.items() if v}
        got_usage = {(r["user_id"], r["meter"], r["period_id"]): r["used_micro"]
                     for r in usage if r["used_micro"]}
        assert got_usage == want_usage, differ("usage_counters", want_usage, got_usage)
        want_credits = {(u, m): v for u, s in model.users.items()
                        for m, v in s.credits.items() if v}
        got_credits = {(r["user_id"], r["meter"]): r["balance_micro"]
                       for r in balances if r["balance_micro"]}
        assert got_credits == want_credits, differ("credit_balances", want_credits, got_credits)
        want_receipts = {o.order_id: (o.payment_id, o.user, o.plan, "succeeded", o.credits,
                                      o.cents) for o in model.orders.values()}
        got_receipts = {r["order_id"]: (r["payment_id"], r["user_id"], r["plan_code"],
                                        r["status"], {m: int(v) for m, v in r["credits"].items()},
                                        int(Decimal(r["amount"]) * 100)) for r in receipts}
        assert got_receipts == want_receipts, differ("receipts", want_receipts, got_receipts)
        want_refunds = {r.refund_id: (r.order.order_id, r.wanted, r.taken, r.revoked)
                        for r in model.refunds}
        got_refunds = {r["refund_id"]: (r["order_id"], dict(r["wanted"]), dict(r["taken"]),
                                        r["plan_revoked"]) for r in refunds}
        assert got_refunds == want_refunds, differ("refunds", want_refunds, got_refunds)
        assert dict(counts) == {"pending": 0, "poison": 0,
                                "dead_letters": model.dead_letters}, dict(counts)
        conflicts = sum(r.stats.ref_conflicts for r in self.reconcilers)
        assert conflicts == 0, f"{conflicts} debits refused by the ledger as a ref's second"


@pytest.mark.timeout(480)  # a failure: generation, SHRINK_SECONDS of shrinking, the report
def test_random_histories_keep_the_invariants(servers: Servers, own_db_dsn: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariants 1 to 5 hold over random histories of debits, retries, credits, payments,
    refunds, plan changes, clock moves, Redis data loss and reconciler restarts, each
    compared step by step with a model of what was acknowledged (module docstring)."""
    chosen = os.environ.get("QG_PROPERTY_SEED")
    examples = int(os.environ.get("QG_PROPERTY_EXAMPLES") or EXAMPLES)

    context = Context(own_database(servers.redis_url), own_db_dsn)

    class Histories(InvariantsMachine):
        def __init__(self) -> None:
            super().__init__(context)

    machine = seed(int(chosen))(Histories) if chosen else Histories
    print(f"invariant machine: {examples} histories of up to {STEPS} steps, seed "
          + (f"{chosen} (QG_PROPERTY_SEED)" if chosen else
             "derandomized (fixed); QG_PROPERTY_SEED=<n> explores another"))
    SEEN.clear()
    # Hypothesis shrinks a failure for up to 5 minutes, the test's whole timeout; each
    # history here costs real round trips, so the budget is cut (hypothesis leaves the
    # constant monkeypatchable for this): a failure still ends with its shrunk steps.
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=STEPS, deadline=None,
        derandomize=not chosen, database=None, print_blob=True, report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow]))
    print("what the histories did:", *(f"  {n:4d}  {what}" for what, n in sorted(SEEN.items())),
          sep="\n")
