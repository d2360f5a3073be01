"""Batch debits: many seed-000 debits in one request, one answer per item.

Each item is decoded, validated and debited on its own, exactly as a single debit would
be (atomic, idempotent on its ref); a bad item gets its own 4xx entry without failing the
others. The items go to Redis together: the worker's pipelined connection sends the debits
it has queued in one loop tick as debit_many calls of up to 32 items (lua/connection.py),
so a batch of 100 is four script calls, not a hundred.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from core import metrics
from core.errors import BacklogFull, DependencyUnavailable, InvalidInput, QuotaError
from core.settings import Caller
from hotpath.responses import error_body
from hotpath.schemas import QuotaDebitIn, decode

if TYPE_CHECKING:
    from hotpath.handlers import Api


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    """The items, each a seed-000 debit body (checked one by one)."""

    items: list[msgspec.Raw]


class BatchItemOut(msgspec.Struct):
    """One item's answer: the status a single debit would have answered, and its body
    (the debit's, or the error envelope)."""

    status: int
    body: Any


class BatchOut(msgspec.Struct):
    """One entry per item, in order."""

    results: list[BatchItemOut]


async def debit_items(api: Api, raw_items: list[msgspec.Raw], caller: Caller,
                      max_items: int) -> BatchOut:
    """Every item's debit, concurrently, answered in order."""
    if not raw_items:
        raise InvalidInput("must hold at least one item", field="items")
    if len(raw_items) > max_items:
        raise InvalidInput(f"at most {max_items} items (BATCH_MAX_ITEMS)", field="items")

    async def one(raw: msgspec.Raw) -> BatchItemOut:
        try:
            body = decode(bytes(raw), QuotaDebitIn)
            return BatchItemOut(200, await api.debit_action(body, caller))
        except QuotaError as exc:
            if isinstance(exc, DependencyUnavailable) and not isinstance(exc, BacklogFull):
                metrics.DEPENDENCY_ERRORS.labels(exc.dependency).inc()
            return BatchItemOut(exc.status, error_body(exc))

    results = await asyncio.gather(*(one(raw) for raw in raw_items))
    assert len(results) == len(raw_items)  # one answer per item, in order
    return BatchOut(list(results))
