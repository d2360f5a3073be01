"""The OpenAPI 3.1 document, generated from the route table and the msgspec models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from core.amounts import NUMBER_TEXT, Amount
from core.settings import Settings
from hotpath.schemas import ErrorOut

if TYPE_CHECKING:
    from hotpath.routing import Operation

_STATUS_TEXT = {
    401: "Missing or invalid X-Internal-Key",
    403: "Insufficient quota, or the caller lacks the scope",
    404: "Unknown plan",
    409: "Already done: a duplicate ref or order (the body carries the original), or a "
         "plan changed since the version the change names",
    413: "Body over the size limit",
    415: "Body is not application/json",
    422: "Invalid input; error.field names the field (ref_reused: same ref, other request)",
    503: "Redis or PostgreSQL unavailable, or the ledger backlog is full; retry",
}


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


#: msgspec describes a Decimal as a string; the API reads a JSON number (or the same digits
#: as a string) and always writes a JSON number.
_READ_DECIMAL = {"type": ["number", "string"], "format": "decimal",
                 "pattern": f"^{NUMBER_TEXT.pattern}$",  # applies to the string form only
                 "description": "An exact decimal, at most 6 places: a JSON number, or the "
                                "same digits as a string"}
_WRITTEN_DECIMAL = {"type": "number", "format": "decimal",
                    "description": "An exact decimal, at most 6 places"}


def _amount_schema(kind: type) -> dict[str, Any]:
    """msgspec's ``schema_hook``: ``Amount`` is described as a Decimal is (then by direction,
    below)."""
    if kind is Amount:
        return {"type": "string", "format": "decimal"}
    raise NotImplementedError(f"no schema for {kind!r}")


def build_spec(settings: Settings, operations: list[Operation]) -> dict[str, Any]:
    """Paths from the route table, components from the request and response models."""
    models: set[type] = {ErrorOut}
    for op in operations:
        models |= {m for m in (op.body, op.result) if m is not None}
        models |= {m for _, m in op.error_bodies}
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, components = msgspec.json.schema_components(
        ordered, schema_hook=_amount_schema, ref_template="#/components/schemas/{name}"
    )
    ref_of = dict(zip(ordered, refs, strict=True))
    read = _reachable({op.body.__name__ for op in operations if op.body is not None},
                      components)
    for name, schema in components.items():
        for decimal in [o for o in _objects(schema) if o.get("format") == "decimal"]:
            decimal.update(_READ_DECIMAL if name in read else _WRITTEN_DECIMAL)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry: dict[str, Any] = {"operationId": op.name, "summary": op.summary,
                                 "responses": {}}
        if op.scope is not None:
            entry["security"] = [{"internalKey": []}]
            entry["description"] = f"Needs a caller with the `{op.scope}` scope."
        params = [{"name": name[1:-1], "in": "path", "required": True,
                   "schema": {"type": "string"}}
                  for name in op.path.split("/") if name.startswith("{")]
        params += [{"name": q.name, "in": "query", "required": q.required, "schema": q.schema,
                    **({"description": q.description} if q.description else {})}
                   for q in op.query]
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": ref_of[op.body]}}}
        ok: dict[str, Any] = {"description": "OK"}
        if op.result is not None:
            ok["content"] = {"application/json": {"schema": ref_of[op.result]}}
        entry["responses"]["200"] = ok
        bodies = dict(op.error_bodies)
        for status in op.errors:
            entry["responses"][str(status)] = {
                "description": _STATUS_TEXT[status],
                "content": {"application/json": {
                    "schema": ref_of[bodies.get(status, ErrorOut)]}},
            }
        paths.setdefault(op.path, {})[op.method.lower()] = entry
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
