"""Prometheus metrics. No per-user labels: a user's numbers are served by the API.

With several workers, PROMETHEUS_MULTIPROC_DIR (set by ``quota-gateway serve``) makes every
worker write its samples to files that /metrics aggregates. A reconciler run on its own
(``quota-gateway reconcile``) serves its metrics on a listener of its own (METRICS_PORT).
"""

from __future__ import annotations

import os
import threading
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

#: How a gauge is read across processes (serve's workers, its reconciler child): the value
#: last set by any of them. A gauge under "max" would keep a dead process's last value for
#: good (a reconciler restarted after a crash left its flush lag behind: an alert that never
#: clears); every gauge here is a reading that the next one replaces.
_LAST_SEEN: Final = "mostrecent"

_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUEST_SECONDS = Histogram(
    "quota_http_request_duration_seconds", "HTTP request latency by route and status class",
    ["route", "status"], buckets=_BUCKETS,
)
DEBITS = Counter(
    "quota_debits_total", "Debit outcomes by meter and result", ["meter", "result"],
)
CREDITS = Counter("quota_credits_total", "Payment credits applied in Redis, by meter", ["meter"])
REFUNDS = Counter("quota_refunds_total", "Refunds applied in Redis, by meter", ["meter"])
WEBHOOKS = Counter(
    "quota_webhooks_total", "Payment notifications by event and outcome", ["event", "outcome"],
)
DEAD_LETTERS = Counter(
    "quota_dead_letters_total", "Notifications kept as dead letters, by reason code", ["reason"],
)
WEBHOOK_REJECTIONS = Counter(
    "quota_webhook_rejections_total",
    "Notifications that failed verification (or were too large to verify), by reason code "
    "and whether a record of them was kept (kept=false: over the rate limit)",
    ["reason", "kept"],
)
PENDING_APPLIES = Gauge(
    "quota_pending_applies", "Write-through changes committed in PostgreSQL, not yet in Redis",
    multiprocess_mode=_LAST_SEEN,
)
DEPENDENCY_ERRORS = Counter(
    "quota_dependency_errors_total", "Redis and PostgreSQL failures seen by the hot path",
    ["dependency"],
)
REDIS_WAITS = Counter(
    "quota_redis_waits_total",
    "WAITs for replicas sent right after a write (REDIS_WAIT_REPLICAS), by script",
    ["op"],
)
REDIS_WAIT_SHORT = Counter(
    "quota_redis_wait_short_total",
    "Writes answered after fewer replicas acknowledged them than asked within "
    "REDIS_WAIT_TIMEOUT_MS (or the WAIT failed), by script; the write stands",
    ["op"],
)
USER_LOADS = Counter("quota_user_loads_total", "User states rebuilt from PostgreSQL")
REFS_RESTORED = Counter(
    "quota_refs_restored_total",
    "Idempotency keys Redis had lost, restored from the ledger while loading a user",
)
BACKLOG_REFUSALS = Counter(
    "quota_backlog_refusals_total", "Debits refused because the unflushed ledger is too long",
)
FLUSHED_EVENTS = Counter("quota_flushed_events_total", "Ledger events written to PostgreSQL")
FLUSH_BATCH_SIZE = Histogram(
    "quota_flush_batch_size_events", "Events per flushed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
FLUSH_SECONDS = Histogram(
    "quota_flush_batch_duration_seconds", "Time to write one batch to PostgreSQL",
    buckets=_BUCKETS,
)
LEDGER_BACKLOG = Gauge(
    "quota_ledger_backlog_entries", "Unflushed ledger entries in all shard streams, as the "
    "service last saw them (/ready)", multiprocess_mode=_LAST_SEEN,
)
LEDGER_BACKLOG_LIMIT = Gauge(
    "quota_ledger_backlog_limit_entries", "Unflushed entries at which debits answer 503 "
    "(every shard at its share)", multiprocess_mode=_LAST_SEEN,
)
LEDGER_OLDEST_SECONDS = Gauge(
    "quota_ledger_oldest_seconds", "Age of the oldest unflushed ledger entry, as the service "
    "last saw it (/ready): the flush lag even when no reconciler runs",
    multiprocess_mode=_LAST_SEEN,
)
FLUSH_LAG_SECONDS = Gauge(
    "quota_flush_lag_seconds", "Age of the oldest unflushed ledger event per shard",
    ["shard"], multiprocess_mode=_LAST_SEEN,
)
FLUSH_LAG_ENTRIES = Gauge(
    "quota_flush_lag_entries", "Unflushed ledger entries per shard", ["shard"],
    multiprocess_mode=_LAST_SEEN,
)
POISON_EVENTS = Counter("quota_poison_events_total", "Ledger entries moved to the poison table")
LEDGER_REF_CONFLICTS = Counter(
    "quota_ledger_ref_conflicts_total",
    "Debits not written because their (user, ref) was already debited in the ledger "
    "within the idempotency TTL",
)
LEDGER_REF_REUSES = Counter(
    "quota_ledger_ref_reuses_total",
    "Debits of a ref reused past the idempotency TTL, written as the ref's next round",
)
HOLDS = Counter(
    "quota_holds_total",
    "Reservations (holds) by meter and outcome: created, settled, released, expired",
    ["meter", "outcome"],
)
OPEN_HOLDS = Gauge(
    "quota_open_holds", "Open holds the reconciler last counted in PostgreSQL",
    multiprocess_mode=_LAST_SEEN,
)


def _registry() -> CollectorRegistry:
    """This process's metrics, or every process's when they count in files."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics (aggregated across workers when multiprocess)."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def serve_metrics(host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """A Prometheus listener (any path answers the exposition text) on a daemon thread,
    for a process without an HTTP server of its own (the reconciler); port 0 picks one."""
    return start_http_server(port, addr=host, registry=_registry())
