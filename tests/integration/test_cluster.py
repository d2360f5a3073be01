"""The hot path on a real Redis Cluster (a private one: these tests move slots, flush
script caches and change what nodes hold): routing by slot with batches per slot, MOVED,
ASK, NOSCRIPT on every node, the reconciler reading every node's streams, and the
"came back with older data" rule per node."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from core.clock import FixedClock
from core.settings import Settings
from lua.cluster import ClusterRedis, admin_client, slot_of
from lua.connection import RedisUnavailable
from lua.replies import Status
from ops.cluster import LocalCluster, Node
from quota.engine import Engine
from reconciler.main import Reconciler
from tests.support import make_engine, new_ref, new_user

U = 1_000_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A private 3-primary cluster without replicas (failover: test_failover.py)."""
    with tempfile.TemporaryDirectory(prefix="qg-cluster-") as tmp:
        local = LocalCluster(Path(tmp) / "c", primaries=3, replicas=0, appendonly=False)
        local.start()
        try:
            yield local
        finally:
            local.stop()


@pytest.fixture
async def cengine(settings: Settings, clock: FixedClock, cluster: LocalCluster
                  ) -> AsyncIterator[Engine]:
    """An engine on the private cluster (the test's prefix; its keys removed after)."""
    eng = make_engine(settings.with_overrides(redis_url=cluster.url), clock)
    assert isinstance(eng.redis, ClusterRedis)
    try:
        yield eng
    finally:
        await eng.close()
        admin = admin_client(cluster.url, decode_responses=True)
        keys = [k async for k in admin.scan_iter(match=f"{settings.key_prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await admin.unlink(*keys[i:i + 500])
        await admin.aclose()


def _owner(cluster: LocalCluster, key: str) -> Node:
    return cluster.node_of_slot(slot_of(key))


async def test_debits_run_on_the_node_of_their_slot_in_batches_of_one_slot(
    cengine: Engine, cluster: LocalCluster
) -> None:
    """40 users over every node, two debits each in one tick: every debit exact (a call
    mixing slots would be refused CROSSSLOT), and each user's ledger events are in its
    shard's stream on the node serving that slot."""
    users = [new_user() for _ in range(40)]
    nodes = {_owner(cluster, cengine.keys.ledger(cengine.keys.shard(u))).port for u in users}
    assert len(nodes) == 3
    replies = await asyncio.gather(*(cengine.debit(u, "chat", amount * U, new_ref())
                                     for amount in (2, 3) for u in users))
    assert [r.status for r in replies] == [Status.OK] * 80
    for user in users:
        assert (await cengine.check(user, ["chat"])).meters[0].used == 5 * U
        stream = cengine.keys.ledger(cengine.keys.shard(user))
        with _owner(cluster, stream).client() as node:
            events = node.xrange(stream)
        assert sum(1 for _, fields in events if user in str(fields)) == 2
    assert len({r.tx_id for r in replies}) == 80


async def test_a_moved_slot_is_followed_and_the_table_updated(
    cengine: Engine, cluster: LocalCluster
) -> None:
    """A user's slot moved to another primary after the client read the table: the old
    owner answers MOVED, the call goes to the new one and succeeds, the table learns it.
    (Connected to every node before: a new connection would find the moved shard stamped
    by its old node and rebuild it, docs/architecture.md, "Redis Cluster".)"""
    user = new_user()
    assert (await cengine.debit(user, "chat", U, new_ref())).status is Status.OK
    await _connect_everywhere(cengine)
    slot = slot_of(cengine.keys.user(user))
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.primary_nodes() if n is not source)
    _migrate(cluster, slot, source, target, finish=True)
    client = cengine.redis
    assert isinstance(client, ClusterRedis)
    assert client.address_of(slot) == source.address  # the table is stale
    reply = await cengine.debit(user, "chat", U, new_ref())
    assert reply.status is Status.OK and reply.remaining == 48 * U
    assert client.address_of(slot) == target.address


async def test_ask_during_a_migration_reaches_the_importing_node(
    cengine: Engine, cluster: LocalCluster
) -> None:
    """Mid-migration (the slot MIGRATING on its owner, IMPORTING on the target, the keys
    already moved), the owner answers ASK: a one-key call goes with ASKING to the target
    and succeeds; a debit (keys it creates are on neither node yet) gets TRYAGAIN and is
    sent again until the migration ends, then follows MOVED and succeeds."""
    user = new_user()
    assert (await cengine.debit(user, "chat", U, new_ref())).status is Status.OK
    await _connect_everywhere(cengine)
    user_key = cengine.keys.user(user)
    slot = slot_of(user_key)
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.primary_nodes() if n is not source)
    _migrate(cluster, slot, source, target, finish=False)
    try:
        assert await cengine.redis.execute("HGET", user_key, "loaded") is not None
        debit = asyncio.create_task(cengine.debit(user, "chat", U, new_ref()))
        await asyncio.sleep(0.2)
        assert not debit.done()  # TRYAGAIN while the slot migrates
    finally:
        _finish(cluster, slot, target)
    reply = await debit
    assert reply.status is Status.OK and reply.remaining == 48 * U
    assert (await cengine.check(user, ["chat"])).meters[0].used == 2 * U


async def test_an_emptied_script_cache_on_every_node_is_refilled(
    cengine: Engine, cluster: LocalCluster
) -> None:
    """SCRIPT FLUSH on every primary (what a restart or failover does): debits and checks
    go on (EVAL once, then EVALSHA again)."""
    users = [new_user() for _ in range(12)]
    assert all(r.status is Status.OK for r in await asyncio.gather(
        *(cengine.debit(u, "chat", U, new_ref()) for u in users)))
    for node in cluster.primary_nodes():
        with node.client() as c:
            c.script_flush()
    replies = await asyncio.gather(*(cengine.debit(u, "chat", U, new_ref()) for u in users))
    assert {r.remaining for r in replies} == {48 * U}
    assert (await cengine.check(users[0], ["chat"])).meters[0].used == 2 * U


async def test_the_reconciler_flushes_every_nodes_streams(
    cengine: Engine, cluster: LocalCluster
) -> None:
    """Debits of users on every node reach the PostgreSQL ledger once, and every stream is
    left empty; the engine's backlog reads each node's streams."""
    users = [new_user() for _ in range(30)]
    await asyncio.gather(*(cengine.debit(u, "chat", U, new_ref()) for u in users))
    assert (await cengine.backlog()).entries == 30
    admin = admin_client(cluster.url, decode_responses=True)
    try:
        await Reconciler(cengine, admin, name="cluster-test").drain()
        assert (await cengine.backlog()).entries == 0
    finally:
        await admin.aclose()
    async with cengine.db.connection() as conn:
        rows = await conn.fetchval(
            "SELECT count(*) FROM ledger WHERE user_id = ANY($1::text[]) AND kind = 'debit'",
            users)
    assert rows == 30


async def test_a_node_back_with_older_data_rebuilds_only_its_own_shards(
    cengine: Engine, cluster: LocalCluster, settings: Settings
) -> None:
    """One node's shards say another run_id (as on a promoted replica): that node's users
    answer 503 until a reconciler has flushed its streams, then reload from PostgreSQL
    (their usage kept); users of the other nodes are served throughout and not rebuilt."""
    keys = cengine.keys
    users = [new_user() for _ in range(24)]
    await asyncio.gather(*(cengine.debit(u, "chat", 2 * U, new_ref()) for u in users))
    stale_node = _owner(cluster, keys.ledger(keys.shard(users[0])))
    stale = [u for u in users if _owner(cluster, keys.ledger(keys.shard(u))) is stale_node]
    fine = [u for u in users if u not in stale]
    assert stale and fine
    with stale_node.client() as node:
        for shard in range(keys.n_shards):
            key = keys.shard_instance(shard)
            if _owner(cluster, key) is stale_node and node.exists(key):
                node.set(key, "an-older-run-id")
    client = cengine.redis
    assert isinstance(client, ClusterRedis)
    await client.nodes[stale_node.address].close()  # the next call reconnects: checked
    with pytest.raises(RedisUnavailable, match="older data"):
        await cengine.debit(stale[0], "chat", U, new_ref())
    assert (await cengine.debit(fine[0], "chat", U, new_ref())).status is Status.OK
    admin = admin_client(cluster.url, decode_responses=True)
    try:
        await Reconciler(cengine, admin, name="rebuild-test").drain()
        for _ in range(100):
            try:
                reply = await cengine.debit(stale[0], "chat", U, new_ref())
                break
            except RedisUnavailable:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the node was not rebuilt")
        assert reply.status is Status.OK and reply.remaining == 47 * U  # usage kept
        hashes_of_fine = await admin.exists(*(keys.user(u) for u in fine[1:]))
        assert hashes_of_fine == len(fine) - 1  # not rebuilt
        assert await admin.exists(keys.user(stale[1])) == 0  # dropped, loads on first use
    finally:
        await admin.aclose()
    assert (await cengine.check(stale[1], ["chat"])).meters[0].used == 2 * U


async def _connect_everywhere(engine: Engine) -> None:
    """A call on every primary, so the client holds a connection to each."""
    client = engine.redis
    assert isinstance(client, ClusterRedis)
    await client.refresh()
    for address in set(client.table):
        await client._node(address).execute("PING")


# -- slot migration by hand (what redis-cli --cluster reshard does) -------------------------
def _migrate(cluster: LocalCluster, slot: int, source: Node, target: Node, *,
             finish: bool) -> None:
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    with target.client() as t:
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with source.client() as s:
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while True:
            keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            s.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        _finish(cluster, slot, target)


def _finish(cluster: LocalCluster, slot: int, target: Node) -> None:
    target_id = cluster.node_id(target)
    for node in cluster.primary_nodes():
        with node.client() as c, contextlib.suppress(redis.ResponseError):
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
