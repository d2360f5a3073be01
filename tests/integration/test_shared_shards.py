"""Several reconcilers share the shard streams: every event is written exactly once."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import debit, make_engine, new_ref, new_user


async def test_three_reconcilers_flush_a_shared_load_exactly_once(
    client: httpx.AsyncClient, engine: Engine, settings: Settings, clock: FixedClock,
    raw_redis: aioredis.Redis,
) -> None:
    """Three consumers of one group flush concurrently while debits arrive; the ledger holds
    each accepted debit once, and their counts add up to the accepted total."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    small = settings.with_overrides(flush_batch_max=20, flush_block_ms=20)
    engines = [make_engine(small, clock) for _ in range(3)]
    workers = [Reconciler(e, raw_redis, name=f"shared-{i}") for i, e in enumerate(engines)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    users = [new_user() for _ in range(20)]
    accepted: dict[str, str] = {}
    try:
        for _ in range(15):
            batch = [(rng.choice(users), new_ref()) for _ in range(40)]
            replies = await asyncio.gather(*(debit(client, u, 1, r) for u, r in batch))
            for (user, _), reply in zip(batch, replies, strict=True):
                if reply.status_code == 200:
                    accepted[reply.json()["tx_id"]] = user
            await asyncio.sleep(0)
        for _ in range(600):  # until every stream is empty (bounded: ~30 s)
            lengths = [await raw_redis.xlen(engine.keys.ledger(s))
                       for s in range(settings.n_shards)]
            if not any(lengths):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for e in engines:
            await e.redis.close()
            await e.db.close()
    async with engine.db.connection() as conn:
        rows = await conn.fetch("SELECT tx_id::text, user_id FROM ledger WHERE user_id = ANY($1)",
                                users)
    ledger = {r["tx_id"]: r["user_id"] for r in rows}
    assert ledger == accepted, f"seed {seed}"
    shares = [w.stats.inserted for w in workers]
    assert sum(shares) == len(accepted), f"seed {seed}: {shares}"
    assert all(share > 0 for share in shares), f"seed {seed}: not shared: {shares}"
    assert Counter(ledger.values()) == Counter(accepted.values())
    print(f"seed {seed}: {len(accepted)} debits flushed by three reconcilers as {shares}")
