"""The plan catalog: its wire format, its validation, and its rows in PostgreSQL.

A plan reads and writes as ``{"plan_code": "pro_month", "meters": {"chat": {"limit":
10000, "period": "month"}}, "duration_days": 30, "price": "990.00", "currency": "RUB"}``.
Meters are data: any name matching ``METER_PATTERN``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Annotated, Any, Literal

import msgspec

from core.amounts import (
    MAX_UNITS,
    SCALE_DIGITS,
    ZERO,
    Amount,
    AmountError,
    decode_hook,
    exact_number,
    from_micro,
    to_micro,
)
from core.errors import InvalidInput, VersionConflict
from core.ids import END, METER_PATTERN
from persistence.db import Database
from persistence.queries import QUERIES

PLAN_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
PERIOD_CODES = {"day": "d", "month": "m", "none": "n", "cycle": "c"}
MAX_METERS = 32
MAX_PRICE = Decimal("100000000")
MAX_DURATION_DAYS = 3660
#: A catalog version is a PostgreSQL bigint.
MAX_VERSION = 2**63 - 1

# The bounds the wire format states (msgspec checks them, the OpenAPI spec shows them);
# ``extra_json_schema`` only describes amounts, which validate_plan checks.
MeterName = Annotated[str, msgspec.Meta(pattern=rf"^{METER_PATTERN.pattern}{END}")]
Limit = Annotated[Amount, msgspec.Meta(extra_json_schema={
    "minimum": 0, "maximum": MAX_UNITS, "multipleOf": 10.0 ** -SCALE_DIGITS})]
Price = Annotated[Amount, msgspec.Meta(extra_json_schema={
    "minimum": 0, "maximum": int(MAX_PRICE), "multipleOf": 0.01})]
Currency = Annotated[str, msgspec.Meta(pattern=rf"^[A-Z]{{3}}{END}",
                                       description="ISO 4217 code")]


class MeterBody(msgspec.Struct, forbid_unknown_fields=True):
    """One meter of a plan on the wire."""

    limit: Limit
    period: Literal["day", "month", "cycle", "none"]
    #: How far past what is free a hold's settle may take the meter (usage past the
    #: allowance, forgiven when the period resets); 0: never past what is free.
    overdraft: Limit = ZERO


class PlanBody(msgspec.Struct, forbid_unknown_fields=True):
    """A plan on the wire (PUT body, catalog file); plan_code is optional in a PUT body.

    ``version`` and ``updated_by`` are what a GET answers: a body read, changed and put
    back carries them. ``version``, when given, is the version the change was made from:
    the PUT is refused (409) if the plan has another one by now (or does not exist, unless
    it is 0), so that two editors cannot overwrite each other unseen. ``updated_by`` is
    the server's to set (the caller's name) and is ignored."""

    meters: Annotated[dict[MeterName, MeterBody], msgspec.Meta(max_length=MAX_METERS)]
    plan_code: Annotated[str, msgspec.Meta(
        pattern=rf"^{PLAN_PATTERN.pattern}{END}",
        description="The path's plan code, if given")] | None = None
    duration_days: Annotated[int, msgspec.Meta(ge=1, le=MAX_DURATION_DAYS)] | None = None
    price: Price = ZERO
    currency: Currency = "RUB"
    version: Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)] | None = None
    updated_by: str | None = None


@dataclass(frozen=True, slots=True)
class MeterRule:
    """A meter's allowance in micro-units and its period ('day', 'month', 'cycle', 'none');
    for 'cycle', when the meter became one (epoch ms; 0 until stored): an assignment that
    began before keeps calendar months."""

    period: str
    limit_micro: int
    since_ms: int = 0
    overdraft_micro: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated plan."""

    plan_code: str
    meters: dict[str, MeterRule]
    duration_days: int | None
    price: str
    currency: str
    version: int = 0
    updated_by: str = ""

    def to_json(self) -> dict[str, Any]:
        """The wire format (amounts exact)."""
        return {
            "plan_code": self.plan_code,
            "meters": {
                name: {"limit": from_micro(rule.limit_micro), "period": rule.period,
                       # only when set: a plan without holds' overdraft reads as before
                       **({"overdraft": from_micro(rule.overdraft_micro)}
                          if rule.overdraft_micro else {})}
                for name, rule in sorted(self.meters.items())
            },
            "duration_days": self.duration_days,
            "price": self.price,
            "currency": self.currency,
            "version": self.version,
            "updated_by": self.updated_by,
        }


def validate_plan(code: str, body: PlanBody) -> Plan:
    """Check a plan's values; raise InvalidInput naming the field at fault."""
    if not PLAN_PATTERN.fullmatch(code):
        raise InvalidInput(f"must match ^{PLAN_PATTERN.pattern}$", field="plan_code")
    if body.plan_code is not None and body.plan_code != code:
        raise InvalidInput("differs from the plan code in the path", field="plan_code")
    if len(body.meters) > MAX_METERS:
        raise InvalidInput(f"at most {MAX_METERS} meters", field="meters")
    meters = {}
    for name, meter in body.meters.items():
        if not METER_PATTERN.fullmatch(name):
            raise InvalidInput(f"meter names must match ^{METER_PATTERN.pattern}$", field="meters")
        try:
            limit = to_micro(meter.limit, allow_zero=True)
        except AmountError as exc:
            raise InvalidInput(str(exc), field=f"meters.{name}.limit") from None
        try:
            overdraft = to_micro(meter.overdraft, allow_zero=True)
        except AmountError as exc:
            raise InvalidInput(str(exc), field=f"meters.{name}.overdraft") from None
        meters[name] = MeterRule(meter.period, limit, overdraft_micro=overdraft)
    if body.duration_days is not None and not 1 <= body.duration_days <= MAX_DURATION_DAYS:
        raise InvalidInput(f"must be between 1 and {MAX_DURATION_DAYS}, or null",
                           field="duration_days")
    cycles = sorted(name for name, rule in meters.items() if rule.period == "cycle")
    if cycles and body.duration_days is None:
        raise InvalidInput(f"a plan with cycle meters ({', '.join(cycles)}) needs a duration: "
                           "the cycle is the plan's duration from its purchase",
                           field="duration_days")
    price = body.price
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise InvalidInput(f"must be between 0 and {MAX_PRICE}", field="price")
    if price != price.quantize(Decimal("0.01")):
        raise InvalidInput("must have at most 2 decimal places", field="price")
    if not re.fullmatch(r"[A-Z]{3}", body.currency):
        raise InvalidInput("must be an ISO 4217 code such as RUB", field="currency")
    return Plan(code, meters, body.duration_days, f"{price.quantize(Decimal('0.01'))}",
                body.currency)


def read_catalog_file(text: bytes | None = None) -> list[Plan]:
    """The plans of the catalog file shipped in the repository (or of ``text``)."""
    if text is None:
        text = (resources.files(__package__) / "plans.json").read_bytes()
    decoded = msgspec.json.Decoder(dict[str, Any], float_hook=exact_number).decode(text)
    plans = msgspec.convert(decoded["plans"], type=list[PlanBody], dec_hook=decode_hook)
    return [validate_plan(body.plan_code or "", body) for body in plans]


def _from_row(row: Any, meters: list[dict[str, str]]) -> Plan:
    return Plan(
        plan_code=row["plan_code"],
        meters={
            m["meter"]: MeterRule(m["period"], int(m["limit_micro"]),
                                  int(m.get("since_ms") or 0),
                                  int(m.get("overdraft_micro") or 0)) for m in meters
        },
        duration_days=row["duration_days"],
        price=row["price"],
        currency=row["currency"],
        version=row["version"],
        updated_by=row["updated_by"],
    )


async def list_plans(db: Database) -> list[Plan]:
    """Every plan in the catalog."""
    rows = await db.fetch("list_plans")
    return [_from_row(row, row["meters"]) for row in rows]


async def put_plan(db: Database, plan: Plan, caller: str, *,
                   from_version: int | None = None, now_ms: int = 0) -> Plan:
    """Create or replace a plan as ``caller``; returns it with its new catalog version.

    With ``from_version`` the plan must still be at that version (0: must not exist yet),
    else VersionConflict, and nothing changes. A meter that becomes ``cycle`` records
    ``now_ms`` (the service's clock) as when it did; one already ``cycle`` keeps its time."""
    async with db.transaction() as conn:
        await conn.execute(QUERIES["lock_catalog"])
        if from_version is not None:
            row = await conn.fetchrow(QUERIES["get_plan_row"], plan.plan_code)
            current = row["version"] if row is not None else 0
            if current != from_version:
                raise VersionConflict(
                    f"the plan is at version {current}, not {from_version}: read it again",
                    current)
        version = await conn.fetchval(
            QUERIES["upsert_plan"], plan.plan_code, plan.duration_days, plan.price,
            plan.currency, caller,
        )
        since = {r["meter"]: r["since_ms"]
                 for r in await conn.fetch(QUERIES["plan_cycle_since"], plan.plan_code)}
        await conn.execute(QUERIES["delete_plan_meters"], plan.plan_code)
        names = sorted(plan.meters)
        await conn.execute(
            QUERIES["insert_plan_meters"], plan.plan_code, names,
            [plan.meters[n].period for n in names], [plan.meters[n].limit_micro for n in names],
            # a meter already `cycle` keeps its time; one that becomes it: now
            [since.get(n, now_ms) if plan.meters[n].period == "cycle" else None
             for n in names],
            [plan.meters[n].overdraft_micro for n in names],
        )
    return Plan(plan.plan_code, plan.meters, plan.duration_days, plan.price, plan.currency,
                version, caller)


async def seed_missing(db: Database, plans: list[Plan]) -> list[str]:
    """Insert the catalog file's plans that PostgreSQL does not have yet."""
    existing = {p.plan_code for p in await list_plans(db)}
    added = []
    for plan in plans:
        if plan.plan_code not in existing:
            # no one holds a plan not in the catalog yet: `cycle` since the beginning
            await put_plan(db, plan, "migrate", now_ms=0)
            added.append(plan.plan_code)
    return added


def catalog_fields(plans: list[Plan]) -> list[str]:
    """The field/value pairs of a shard's catalog hash (see lua/load_catalog.lua)."""
    fields: list[str] = []
    for plan in plans:
        fields += [plan.plan_code, ",".join(sorted(plan.meters))]
        for name, rule in plan.meters.items():
            rule_text = f"{PERIOD_CODES[rule.period]}:{rule.limit_micro}"
            if rule.period == "cycle":  # 'c:<allowance>:<since ms>' (lua/_common.lua)
                rule_text += f":{rule.since_ms}"
            fields += [f"{plan.plan_code}|{name}", rule_text]
            if rule.overdraft_micro:  # what a settle may take past what is free (settle.lua)
                fields += [f"{plan.plan_code}|{name}|o", str(rule.overdraft_micro)]
    return fields
