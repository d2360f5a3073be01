"""Unauthenticated senders cannot fill PostgreSQL through the payment webhook (issue #17,
defect 3): a notification that fails verification is recorded (sender, reason, size, body
hash), never kept whole, at most REJECTIONS_PER_SENDER per sender and REJECTIONS_MAX in
all, and at most a rate of records a second per process.

The bound: ``webhook_rejections`` holds at most REJECTIONS_MAX (10,000) rows of at most
about 500 bytes with its index (128-character sender, 300-character reason), so 5 MB
whatever is posted; nothing reaches ``dead_letters``."""

from __future__ import annotations

import secrets

import asyncpg

from core.clock import FixedClock
from core.errors import Rejected
from core.settings import Settings
from payments.webhook import REJECTIONS_MAX, PaymentWebhook, RateLimit
from tests.payment_support import new_payment, notification, payment_object
from tests.support import WEBHOOK, app_client, new_user, read_metric

#: What 10,000 forged posts may add to PostgreSQL (both tables, with their indexes).
FLOOD_BOUND_BYTES = 5 * 1024 * 1024


async def table_bytes(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        size: int = await conn.fetchval(
            "SELECT pg_total_relation_size('webhook_rejections') "
            "+ pg_total_relation_size('dead_letters')")
        return size
    finally:
        await conn.close()


async def test_ten_thousand_forged_posts_stay_within_the_bound(
    settings: Settings, clock: FixedClock, own_db_dsn: str
) -> None:
    """10,000 unsigned 1 KiB posts: every one answers 401 and is counted; PostgreSQL grows
    by less than FLOOD_BOUND_BYTES, no dead letter is stored, and the records kept are at
    most the per-sender cap."""
    local = settings.with_overrides(db_dsn=own_db_dsn)
    before = await table_bytes(own_db_dsn)
    body = notification("payment.succeeded", payment_object(
        new_payment(), new_user(), "pro_month", units_chat="100", note="x" * 800))
    async with app_client(local, clock) as http:
        counted = await read_metric(http, "quota_webhook_rejections_total",
                                    reason="unverified", kept="true")
        dropped = await read_metric(http, "quota_webhook_rejections_total",
                                    reason="unverified", kept="false")
        statuses = set()
        for _ in range(10_000):
            response = await http.post(WEBHOOK, content=body)
            statuses.add(response.status_code)
        assert statuses == {401}
        kept = await read_metric(http, "quota_webhook_rejections_total",
                                 reason="unverified", kept="true") - counted
        limited = await read_metric(http, "quota_webhook_rejections_total",
                                    reason="unverified", kept="false") - dropped
    assert kept + limited == 10_000
    conn = await asyncpg.connect(own_db_dsn)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM webhook_rejections")
        letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        await conn.close()
    assert letters == 0
    assert rows <= 100  # one sender: its cap
    assert await table_bytes(own_db_dsn) - before < FLOOD_BOUND_BYTES


async def test_records_keep_the_newest_per_sender_and_in_all(
    settings: Settings, clock: FixedClock, own_db_dsn: str
) -> None:
    """With the rate unlimited: each sender keeps its newest ``per_sender`` records, and
    the table its newest ``max_kept``, whatever the number of senders."""
    local = settings.with_overrides(db_dsn=own_db_dsn)
    async with app_client(local, clock) as http:
        webhook: PaymentWebhook = http._transport.app.state.api.webhook  # type: ignore
        limited = PaymentWebhook(webhook.payments, webhook.verifier, per_sender=5,
                                 max_kept=40, rate=RateLimit(1e9, 10**9))
        refusal = Rejected(401, "unverified", "X-Signature header is missing")
        ids = [await limited.reject(b"forged", "198.51.100.7", refusal) for _ in range(12)]
        for i in range(60):  # many senders, one record each
            await limited.reject(secrets.token_bytes(8), f"203.0.113.{i}", refusal)
        conn = await asyncpg.connect(own_db_dsn)
        try:
            kept = await conn.fetch("SELECT id, sender FROM webhook_rejections ORDER BY id")
        finally:
            await conn.close()
    assert len(kept) == 40  # the total cap
    assert [r["sender"] for r in kept] == [f"203.0.113.{i}" for i in range(20, 60)]
    assert all(i is not None for i in ids)
    # before the other senders pushed them out, the first sender had kept only its 5 newest
    assert ids == sorted(ids)


async def test_the_rate_limit_counts_what_it_does_not_record(
    settings: Settings, clock: FixedClock, own_db_dsn: str
) -> None:
    """Past its burst, a process records no more rejections until tokens come back; each
    refusal is still answered 401 (with no record id) and counted."""
    local = settings.with_overrides(db_dsn=own_db_dsn)
    now = [0.0]
    async with app_client(local, clock) as http:
        api = http._transport.app.state.api  # type: ignore[attr-defined]
        api.webhook.rate = RateLimit(2.0, 3, clock=lambda: now[0])
        answers = [await http.post(WEBHOOK, content=b"{}") for _ in range(5)]
        assert [a.status_code for a in answers] == [401] * 5
        assert [a.json()["rejection_id"] is not None for a in answers] == [True] * 3 + [False] * 2
        now[0] += 1.0  # two tokens back
        later = [await http.post(WEBHOOK, content=b"{}") for _ in range(3)]
        assert [a.json()["rejection_id"] is not None for a in later] == [True, True, False]
    assert REJECTIONS_MAX == 10_000
