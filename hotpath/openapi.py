"""The OpenAPI 3.1 document, generated from the route table and the msgspec models.

It states what the service accepts, as exactly as JSON Schema can say it: a request that
is valid by the document is one the service takes (tests/integration/test_schemathesis.py
holds it to that). Three parts come from outside the models: the configured actions
(settings), the earliest expiry a request may set (the clock), and the string form of an
amount (derived from the amount's bounds).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec

from core.amounts import Amount
from core.ids import END, MAX_ACTION
from core.settings import Settings
from hotpath.handlers import MAX_EXPIRES_AT
from hotpath.responses import JSON
from hotpath.results import ErrorOut
from hotpath.schemas import ACTION_NAME

if TYPE_CHECKING:
    from hotpath.routing import Operation

#: What each status means, as the spec describes it. 400, 405 and (for a route with path
#: parameters) 404 come from the HTTP layer, for every route.
_STATUS_TEXT = {
    400: "Not valid HTTP/1.1 (say a Content-Length that is not a number); the connection "
         "is closed",
    401: "Missing or invalid X-Internal-Key",
    403: "Insufficient quota, or the caller lacks the scope",
    404: "Unknown plan",
    405: "Method not allowed on this path; Allow lists the methods it has",
    409: "Already done: a duplicate ref or order (the body carries the original), or a "
         "plan changed since the version the change names",
    413: "Body over the size limit",
    415: "Body is not application/json",
    422: "Invalid input; error.field names the field (ref_reused: same ref, other request)",
    503: "Redis or PostgreSQL unavailable, or the ledger backlog is full; retry",
}
#: Why the router finds no route for a path: a path parameter that is empty, holds '/',
#: or is '.' or '..' (which clients resolve away).
_NO_ROUTE = "(a path parameter that is empty, holds '/', or is '.' or '..')"
_ALLOW = {"Allow": {"description": "The methods of this path", "required": True,
                    "schema": {"type": "string"}}}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before a retry",
                                "schema": {"type": "integer", "minimum": 0}}}
#: How many days after the spec is built its earliest expiry date lies: a date's midnight
#: in the furthest offset (+23:59) is still in the future then.
_EXPIRY_MARGIN_DAYS = 2


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object within a schema (itself included), depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def _reachable(names: set[str], components: dict[str, Any]) -> set[str]:
    """The components ``names`` refer to, directly or through others, and themselves."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [o["$ref"].rsplit("/", 1)[1] for o in _objects(components[name])
                     if isinstance(o.get("$ref"), str)]
    return seen


def _amount_schema(kind: type) -> dict[str, Any]:
    """msgspec's ``schema_hook``: ``Amount`` is described as a Decimal is (then by direction,
    below)."""
    if kind is Amount:
        return {"type": "string", "format": "decimal"}
    raise NotImplementedError(f"no schema for {kind!r}")


# -- amounts -------------------------------------------------------------------------------
def _places(step: Decimal) -> int:
    """The decimal places of a step such as 0.01."""
    exponent = step.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def _amount_text(low: Decimal, exclusive: bool, high: Decimal, step: Decimal) -> str:
    """The pattern of an amount written as a string: plain decimal digits from ``low`` (0)
    to ``high`` (a power of ten), at most as many places as ``step`` (a power of ten) has,
    trailing zeros aside. The service also reads an exponent ("1e3"): JSON Schema has no
    pattern for that which keeps to the bounds, so the document names the plain form."""
    digits, places = len(str(int(high))) - 1, _places(step)
    assert low == 0 and high == 10 ** digits and step == Decimal(1).scaleb(-places), \
        "an amount's bounds must be 0 to a power of ten, its step a power of ten"
    below = rf"(?:0|[1-9][0-9]{{0,{digits - 1}}})(?:\.[0-9]{{1,{places}}}0*)?" if places \
        else rf"(?:0|[1-9][0-9]{{0,{digits - 1}}})(?:\.0+)?"
    zero = r"-?0(?:\.0+)?"  # "-0" is zero too
    choices = "|".join([below, rf"{int(high)}(?:\.0+)?", *(() if exclusive else (zero,))])
    return rf"^(?!{zero}{END})(?:{choices}){END}" if exclusive else rf"^(?:{choices}){END}"


def _read_amount(node: dict[str, Any]) -> None:
    """An amount in a request: a JSON number within its bounds, or its digits as a string."""
    exclusive = "exclusiveMinimum" in node
    low = Decimal(str(node.get("exclusiveMinimum", node.get("minimum", 0))))
    high, step = Decimal(str(node["maximum"])), Decimal(str(node["multipleOf"]))
    node.update({
        "type": ["number", "string"], "format": "decimal",
        "pattern": _amount_text(low, exclusive, high, step),  # applies to strings only
        "description": f"An exact decimal {'over' if exclusive else 'from'} {low} to "
                       f"{high}, at most {_places(step)} places "
                       "(trailing zeros aside): a JSON number, or the same digits as a "
                       "string (the service also reads a string with an exponent, '1e3')"})


def _written_amount(node: dict[str, Any]) -> None:
    node.update({"type": "number", "format": "decimal",
                 "description": "An exact decimal, at most 6 places"})


# -- expiry times --------------------------------------------------------------------------
def _digits_between(low: str, high: str) -> str:
    """A pattern of the digit strings from ``low`` to ``high`` (of one length)."""
    width = len(low)
    if low == high:
        return low
    if width == 1:
        return f"[{low}-{high}]"
    if low == "0" * width and high == "9" * width:
        return f"[0-9]{{{width}}}"
    if low[0] == high[0]:
        return low[0] + _digits_between(low[1:], high[1:])
    rest = width - 1
    parts = [low[0] + _digits_between(low[1:], "9" * rest)]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" + _digits_between(
            "0" * rest, "9" * rest))
    parts.append(high[0] + _digits_between("0" * rest, high[1:]))
    return f"(?:{'|'.join(parts)})"


def _month_days(months: list[int]) -> str:
    """``MM-DD`` of every day of these months (29 February left out: not every year has it)."""
    def listed(values: list[int]) -> str:
        return f"(?:{'|'.join(f'{v:02d}' for v in values)})"

    thirty = [m for m in months if m != 2]
    longest = [m for m in months if calendar.monthrange(2001, m)[1] == 31]
    parts = [f"{listed(months)}-(?:0[1-9]|1[0-9]|2[0-8])"]
    if thirty:
        parts.append(f"{listed(thirty)}-(?:29|30)")
    if longest:
        parts.append(f"{listed(longest)}-31")
    return f"(?:{'|'.join(parts)})"


def _first_expiry(now_ms: int) -> date:
    """The earliest date the spec admits for an expiry."""
    return (datetime.fromtimestamp(now_ms / 1000, UTC)
            + timedelta(days=_EXPIRY_MARGIN_DAYS)).date()


def _future_time_text(first: date, last_year: int) -> str:
    """RFC 3339 times on the dates from ``first`` to the end of ``last_year``."""
    assert first.year < last_year
    days_left = range(first.day, calendar.monthrange(first.year, first.month)[1] + 1)
    dates = [f"{first.year:04d}-{first.month:02d}-(?:{'|'.join(f'{d:02d}' for d in days_left)})"]
    if first.month < 12:
        dates.append(f"{first.year:04d}-{_month_days(list(range(first.month + 1, 13)))}")
    dates.append(f"{_digits_between(f'{first.year + 1:04d}', f'{last_year:04d}')}-"
                 f"{_month_days(list(range(1, 13)))}")
    clock = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
    return (rf"^(?:{'|'.join(dates)})[Tt]{clock}:[0-5][0-9](?:\.[0-9]+)?"
            rf"(?:[Zz]|[+-]{clock}){END}")


def _future_time(node: dict[str, Any], now_ms: int) -> None:
    """A time a request sets ahead: the dates from two days after ``now_ms`` to the end of
    8998, each after now and before MAX_EXPIRES_AT in every offset, as the service wants."""
    del node["x-future"]
    first, last_year = _first_expiry(now_ms), MAX_EXPIRES_AT.year - 2
    node.update({"pattern": _future_time_text(first, last_year),
                 "description": f"RFC 3339 with an offset, in the future and before "
                                f"{MAX_EXPIRES_AT.isoformat()} (the pattern names the "
                                f"dates from {first} to {last_year}-12-31)"})


def _actions(node: dict[str, Any], settings: Settings) -> None:
    """The configured actions (ACTION_METERS) that a request can name."""
    names = sorted(name for name, _ in settings.action_meters
                   if len(name) <= MAX_ACTION and re.search(ACTION_NAME, name))
    node.clear()
    node.update({"type": "string", "enum": names,
                 "description": "A configured action (ACTION_METERS): its meter is debited"})


# -- the document --------------------------------------------------------------------------
def _body_rules(settings: Settings) -> dict[str, dict[str, Any]]:
    """What the handlers check of a body beyond its model: a plan with a 'cycle' meter
    needs a duration (validate_plan in persistence/plans.py); a reserve names an action or
    a meter, not both; a batch holds 1 to BATCH_MAX_ITEMS items (hotpath/batch.py), each
    judged on its own."""
    return {
        "PlanBody": {"anyOf": [
            {"properties": {"meters": {"additionalProperties": {
                "properties": {"period": {"not": {"const": "cycle"}}}}}}},
            {"properties": {"duration_days": {"type": "integer"}},
             "required": ["duration_days"]},
        ]},
        "ReserveIn": {"oneOf": [
            {"required": ["action"], "properties": {"action": {"type": "string"}}},
            {"required": ["meter"], "properties": {"meter": {"type": "string"}}},
        ]},
        "BatchIn": {"properties": {"items": {
            "minItems": 1, "maxItems": settings.batch_max_items,
            "description": "Seed-000 debit bodies, each answered on its own (an invalid "
                           "item gets its own 4xx entry)"}}},
    }


def _merge(target: dict[str, Any], extra: dict[str, Any]) -> None:
    """``extra`` added into ``target``, object by object."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _schema_of(kind: Any) -> dict[str, Any]:
    """A parameter's or a plain answer's schema (types without components)."""
    if isinstance(kind, dict):
        return kind
    schema: dict[str, Any] = msgspec.json.schema(kind)
    return schema


def _responses(op: Operation, ref_of: dict[type, dict[str, str]]) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if op.result is not None:
        schema = ref_of[op.result] if op.result in ref_of else _schema_of(op.result)
        ok["content"] = {op.media_type: {"schema": schema}}
    responses: dict[str, Any] = {"200": ok}
    bodies = dict(op.error_bodies)
    has_path = any(p.location == "path" for p in op.params)
    statuses = sorted({400, 405, *op.errors, *((404,) if has_path else ())})
    for status in statuses:
        text = _STATUS_TEXT[status]
        if status == 404 and has_path:
            text = f"{text}, or no such route {_NO_ROUTE}" if 404 in op.errors \
                else f"No such route {_NO_ROUTE}"
        entry: dict[str, Any] = {"description": text, "content": {JSON: {
            "schema": ref_of[bodies.get(status, ErrorOut)]}}}
        if status == 405:
            entry["headers"] = _ALLOW
        elif status == 503:
            entry["headers"] = _RETRY_AFTER
        responses[str(status)] = entry
    return responses


def _path_entry(op: Operation, ref_of: dict[type, dict[str, str]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"operationId": op.name, "summary": op.summary,
                             "responses": _responses(op, ref_of)}
    if op.scope is not None:
        entry["security"] = [{"internalKey": []}]
        entry["description"] = f"Needs a caller with the `{op.scope}` scope."
    declared = {p.name for p in op.params if p.location == "path"}
    in_path = {part[1:-1] for part in op.path.split("/") if part.startswith("{")}
    assert declared == in_path, f"{op.name}: path parameters {in_path} declared {declared}"
    if op.params:
        entry["parameters"] = [
            {"name": p.name, "in": p.location, "required": p.required or p.location == "path",
             "schema": _schema_of(p.kind), **({"description": p.description}
                                               if p.description else {})}
            for p in op.params]
    if op.body is not None:
        entry["requestBody"] = {"required": True, "content": {
            JSON: {"schema": ref_of[op.body]}}}
    return entry


def build_spec(settings: Settings, operations: list[Operation],
               now_ms: int | None = None) -> dict[str, Any]:
    """Paths from the route table, components from the request and response models;
    ``now_ms`` (default: the wall clock) dates the earliest expiry a request may set."""
    if now_ms is None:
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
    models: set[type] = {ErrorOut}
    for op in operations:
        models |= {m for m in (op.body, op.result) if isinstance(m, type)
                   and issubclass(m, msgspec.Struct)}
        models |= {m for _, m in op.error_bodies}
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, components = msgspec.json.schema_components(
        ordered, schema_hook=_amount_schema, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(ordered, refs, strict=True))
    read = _reachable({op.body.__name__ for op in operations if op.body is not None},
                      components)
    for name, schema in components.items():
        for node in list(_objects(schema)):
            if node.pop("x-hold-ttl", False):
                node["maximum"] = settings.hold_max_ttl_seconds
            if node.get("format") == "decimal":
                (_read_amount if name in read else _written_amount)(node)
            elif node.get("x-future"):
                _future_time(node, now_ms)
            elif node.get("x-actions"):
                _actions(node, settings)
    for name, rule in _body_rules(settings).items():
        if name in components:
            _merge(components[name], rule)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _path_entry(op, ref_of)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Quota gateway", "version": settings.service_version,
                 "description": "Billing and quota service: atomic Redis hot path, "
                                "PostgreSQL source of truth. Amounts are exact decimals "
                                "with at most 6 places."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"internalKey": {"type": "apiKey", "in": "header",
                                                "name": "X-Internal-Key"}},
        },
    }
