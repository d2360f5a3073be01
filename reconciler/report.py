"""The nightly reconciliation: day totals, Redis-vs-ledger drift, flush lag, payments and
holds.

Drift is judged per (user, meter, open period): Redis' counter must equal the usage flushed
to PostgreSQL plus the allowance part of the events still in the shard streams. Counters
are read after the streams and the ledger, and a user showing drift is read again (the
reconciler may have flushed in between) before it is reported.
"""

from __future__ import annotations

import csv
import html
import io
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from core.amounts import format_micro
from core.clock import from_ms, to_ms
from core.events import BadEvent, unpack
from quota.engine import Engine
from reconciler.consumer import StreamConsumer, lag_seconds

CounterKey = tuple[str, str, str]  # user, meter, period id
RECHECKS = 3
#: The day's totals and hours read every raw row of the day (hundreds of millions at
#: volume; timed in docs/benchmarks.md): far past DB_TIMEOUT_SECONDS, a request's bound.
DAY_QUERY_TIMEOUT_SECONDS = 1800.0
#: A hold open this long past its expiry is reported: its expiry never reached the ledger.
HOLD_OVERDUE = timedelta(minutes=10)


@dataclass
class Report:
    """Everything the report files and the summary row are made of."""

    report_date: str
    generated_at: str
    time_zone: str
    totals: list[dict[str, Any]] = field(default_factory=list)
    hourly: dict[str, list[str]] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    open_periods: list[str] = field(default_factory=list)
    counters_checked: int = 0
    unflushed_entries: int = 0
    flush_lag_seconds: float = 0.0
    payments_checked: int = 0
    payment_mismatches: list[dict[str, Any]] = field(default_factory=list)
    holds: dict[str, Any] = field(default_factory=dict)
    hold_mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def drift_count(self) -> int:
        """How many (user, meter, period) disagree, plus payments not credited exactly once,
        plus holds the ledger does not account for."""
        return len(self.drift) + len(self.payment_mismatches) + len(self.hold_mismatches)


async def _redis_counters(redis: aioredis.Redis, engine: Engine, periods: set[str]
                          ) -> dict[CounterKey, int]:
    """Every period counter and lifetime usage of the open periods, and every cycle
    counter (a plan's cycle in Redis is one in force), from Redis."""
    keys_of = engine.keys
    found: dict[CounterKey, int] = {}
    keys = [k async for k in redis.scan_iter(match=keys_of.counter_pattern(), count=1000)]
    values = await redis.mget(keys) if keys else []
    for key, value in zip(keys, values, strict=True):
        parsed = keys_of.parse_counter(key)
        if value is not None and parsed is not None and (
                parsed[2] in periods or parsed[2].startswith("y:")):
            found[parsed] = int(value)
    async for key in redis.scan_iter(match=keys_of.user_pattern(), count=1000, _type="hash"):
        user = keys_of.user_of(key)
        if user is None:  # a hash of the user's (holds, ref buckets), not its state hash
            continue
        state: dict[str, str] = await redis.hgetall(key)  # type: ignore[assignment]
        for name, value in state.items():
            if name.startswith("n:"):
                found[(user, name[2:], "n")] = int(value)
    return found


async def _unflushed(consumer: StreamConsumer) -> tuple[dict[CounterKey, int], int]:
    """Allowance usage still in the streams, per counter; and the entry count."""
    pending: dict[CounterKey, int] = defaultdict(int)
    count = 0
    for stream in consumer.streams:
        start = "-"
        while True:
            entries: Any = await consumer.redis.xrange(stream, min=start, count=1000)
            for _, fields in entries:
                count += 1
                try:
                    values = unpack(fields)
                except BadEvent:
                    continue
                if values["k"] in ("debit", "commit"):  # a hold's settle counts as one
                    pending[(values["u"], values["m"], values["p"])] += int(values["al"])
            if len(entries) < 1000:
                break
            start = f"({entries[-1][0]}"
    return pending, count


async def build(engine: Engine, redis: aioredis.Redis, day: date) -> Report:
    """Compute the report for ``day`` (drift is always about the periods open now)."""
    zone = engine.calendar.zone
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    end = start + timedelta(days=1)
    report = Report(day.isoformat(), datetime.now(tz=zone).isoformat(timespec="seconds"),
                    engine.settings.timezone)
    rows = await engine.db.fetch("day_totals", start, end, day,
                                 query_timeout=DAY_QUERY_TIMEOUT_SECONDS)
    report.totals = [
        {"plan_code": r["plan_code"], "meter": r["meter"], "debits": r["debits"],
         "amount": format_micro(r["amount_micro"]),
         "from_allowance": format_micro(r["allowance_micro"]),
         "from_credits": format_micro(r["credits_micro"])} for r in rows
    ]
    hourly: dict[str, list[int]] = defaultdict(lambda: [0] * 25)
    for r in await engine.db.fetch("day_hourly", start, end,
                                   query_timeout=DAY_QUERY_TIMEOUT_SECONDS):
        hourly[r["meter"]][min(r["hour"], 24)] += r["amount_micro"]
    report.hourly = {m: [format_micro(v) for v in hours[:24]] for m, hours in hourly.items()}

    windows = engine.calendar.windows(engine.clock.now_ms())
    periods = {windows.period_id("d"), windows.period_id("m"), "n"}
    report.open_periods = sorted(periods)
    consumer = StreamConsumer(redis, engine.keys, "report", per_stream_count=1000,
                              block_ms=1, claim_idle_ms=1)
    suspects: set[CounterKey] | None = None
    for _ in range(RECHECKS):
        pending, report.unflushed_entries = await _unflushed(consumer)
        live = await _redis_counters(redis, engine, periods)
        cycles = {k[2] for k in live if k[2].startswith("y:")}  # each user's own
        flushed = {(r["user_id"], r["meter"], r["period_id"]): r["used_micro"]
                   for r in await engine.db.fetch("usage_in_periods",
                                                  sorted(periods | cycles))}
        keys = set(live) | set(flushed)
        if suspects is not None:
            keys &= suspects
        report.counters_checked = max(report.counters_checked, len(keys))
        drift = [
            {"user_id": k[0], "meter": k[1], "period": k[2],
             "redis": format_micro(live.get(k, 0)), "ledger": format_micro(flushed.get(k, 0)),
             "unflushed": format_micro(pending.get(k, 0)),
             "difference": format_micro(live.get(k, 0) - flushed.get(k, 0) - pending.get(k, 0))}
            for k in sorted(keys)
            # A counter absent from Redis (expired user state) is not drift: it reloads.
            if k in live and live[k] != flushed.get(k, 0) + pending.get(k, 0)
        ]
        suspects = {(d["user_id"], d["meter"], d["period"]) for d in drift}
        report.drift = drift
        if not drift:
            break
    report.flush_lag_seconds = round(lag_seconds(await consumer.lag()), 3)
    # Every succeeded payment of the day: its credits in the ledger exactly once, in Redis.
    report.payments_checked = await engine.db.fetchval("receipts_count", start, end)
    report.payment_mismatches = [
        {"order_id": r["order_id"], "user_id": r["user_id"],
         "receipt": {m: format_micro(int(v)) for m, v in r["credits"].items()},
         "ledger": {m: format_micro(int(v)) for m, v in r["credited"].items()},
         "applied_in_redis": r["applied"]}
        for r in await engine.db.fetch("receipts_without_credit", start, end)
    ]
    # Holds: the day's reserves, settles, releases and expiries; every hold closed that day
    # with exactly one closing event in the ledger (a settle's with the amount settled), and
    # none left open well past its expiry.
    day_holds = await engine.db.fetchrow("holds_day", start, end)
    assert day_holds is not None  # aggregates: one row
    report.holds = {k: day_holds[k] for k in ("created", "settled", "released", "expired",
                                              "open_now")}
    report.holds["settled_units"] = format_micro(day_holds["settled_micro"])
    report.hold_mismatches = [
        {"hold_id": r["hold_id"], "user_id": r["user_id"], "meter": r["meter"],
         "state": r["state"], "closing_events": r["closings"],
         "settled": format_micro(r["settled_micro"]),
         "ledger_settled": format_micro(r["committed_micro"])}
        for r in await engine.db.fetch("holds_unmatched", start, end, HOLD_OVERDUE)
    ]
    return report


def _svg_chart(hourly: dict[str, list[str]]) -> str:
    """Stacked-free grouped bars: usage per meter and hour, scaled per meter."""
    width, height, pad = 760, 40, 4
    rows = []
    for i, (meter, hours) in enumerate(sorted(hourly.items())):
        values = [float(v) for v in hours]  # display only: the exact figures are in the CSV
        top = max(values) or 1.0
        y0 = i * (height + 24) + 20
        rows.append(f'<text x="0" y="{y0 - 6}" font-size="12">{html.escape(meter)} '
                    f'(max {html.escape(max(hours, key=float))} per hour)</text>')
        for hour, value in enumerate(values):
            bar = value / top * height
            rows.append(f'<rect x="{hour * (width // 24) + pad}" y="{y0 + height - bar:.1f}" '
                        f'width="{width // 24 - 2 * pad}" height="{bar:.1f}" fill="#3b6ea5">'
                        f"<title>{hour:02d}:00 {html.escape(hours[hour])}</title></rect>")
    total_height = max(1, len(hourly)) * (height + 24) + 20
    axis = "".join(f'<text x="{h * (width // 24) + pad}" y="{total_height}" font-size="9">'
                   f"{h:02d}</text>" for h in range(24))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{total_height + 12}">{"".join(rows)}{axis}</svg>')


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_files(report: Report, out: Path) -> list[Path]:
    """JSON, CSV (totals and drift) and a one-page HTML with the hourly chart."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"reconciliation-{report.report_date}"
    data = asdict(report) | {"drift_count": report.drift_count}
    paths = [stem.with_suffix(".json"), stem.with_name(stem.name + "-totals.csv"),
             stem.with_name(stem.name + "-drift.csv"), stem.with_suffix(".html")]
    paths[0].write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    for path, rows, columns in (
        (paths[1], report.totals, ["plan_code", "meter", "debits", "amount", "from_allowance",
                                   "from_credits"]),
        (paths[2], report.drift, ["user_id", "meter", "period", "redis", "ledger", "unflushed",
                                  "difference"]),
    ):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        path.write_text(buffer.getvalue(), encoding="utf-8")
    verdict = ("no drift" if not report.drift_count
               else f"{len(report.drift)} counters drift, {len(report.payment_mismatches)} "
                    "payments unmatched")
    periods = html.escape(", ".join(report.open_periods))
    paths[3].write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>Reconciliation {report.report_date}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:2px 6px}}
table{{border-collapse:collapse}} .bad{{color:#b00}} .ok{{color:#070}}</style></head><body>
<h1>Reconciliation {report.report_date} ({html.escape(report.time_zone)})</h1>
<p class="{'bad' if report.drift_count else 'ok'}"><b>{verdict}</b> among
{report.counters_checked} counters of the open periods {periods};
{report.unflushed_entries} ledger entries not flushed yet, flush lag
{report.flush_lag_seconds} s. Generated {html.escape(report.generated_at)}.</p>
<h2>Usage per hour</h2>{_svg_chart(report.hourly)}
<h2>Totals per plan and meter</h2>{_table(report.totals)}
<h2>Drift</h2>{_table(report.drift)}
<h2>Holds</h2><p>{html.escape(", ".join(f"{k}: {v}" for k, v in report.holds.items()))};
{len(report.hold_mismatches)} not accounted for by the ledger.</p>
{_table(report.hold_mismatches)}
<h2>Payments</h2><p>{report.payments_checked} succeeded payments;
{len(report.payment_mismatches)} not matched by exactly one applied credit.</p>
{_table(report.payment_mismatches)}
</body></html>""", encoding="utf-8")
    return paths


async def run(engine: Engine, redis: aioredis.Redis, day: date, out: Path) -> Report:
    """Build, write and record one report."""
    report = await build(engine, redis, day)
    write_files(report, out)
    summary = {"drift_count": report.drift_count, "totals": report.totals,
               "payments_checked": report.payments_checked,
               "payment_mismatches": report.payment_mismatches,
               "holds": report.holds, "hold_mismatches": report.hold_mismatches,
               "unflushed_entries": report.unflushed_entries,
               "flush_lag_seconds": report.flush_lag_seconds, "out": str(out)}
    await engine.db.fetchval("insert_report", day, report.drift_count, summary)
    return report


def previous_day(engine: Engine) -> date:
    """Yesterday in the configured time zone."""
    now = from_ms(engine.clock.now_ms()).astimezone(engine.calendar.zone)
    return (now - timedelta(days=1)).date()


__all__ = ["Report", "build", "previous_day", "run", "to_ms", "write_files"]
