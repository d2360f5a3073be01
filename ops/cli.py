"""The ``quota-gateway`` command: serve, migrate, reconcile, report; the operator's
commands (dead letters, webhook rejections, poisoned ledger entries) are in ``ops.admin``."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from zoneinfo import ZoneInfo

import click

from core.settings import Settings
from ops.admin import dead_letters, ledger, poison, refs_group, user
from ops.config import settings_or_exit as _settings
from ops.lifecycle import Supervised, follow_parent
from ops.workers import run_uvicorn

if TYPE_CHECKING:
    from hotpath.front import HotFront


log = logging.getLogger("quota_gateway")
T = TypeVar("T")


def tune_gc() -> None:
    """Garbage collection for a long-lived server process, once it has started.

    Everything alive after start-up (modules, the app, caches) moves to the permanent
    generation, so full collections no longer walk it, and the young generation is
    collected less often: the request path allocates few reference cycles. This trims
    the stalls a full collection adds to the slowest requests.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def create_worker_app() -> HotFront:
    """The uvicorn factory of ``serve``: the app, then the GC tuned (see ``tune_gc``)."""
    import multiprocessing

    from hotpath.app import create_app

    parent = multiprocessing.parent_process()
    if parent is not None:  # a worker of `serve --workers N`
        follow_parent(signal.SIGTERM, parent.pid)
    app = create_app()
    tune_gc()
    return app


def ensure_servers(settings: Settings) -> Settings:
    """Start embedded Redis/PostgreSQL for whatever URL is not configured."""
    if settings.redis_url and settings.db_dsn:
        return settings
    if settings.production:
        raise click.ClickException("ENV=production needs REDIS_URL and DB_DSN")
    from ops.devservers import EmbeddedPostgres, EmbeddedRedis

    data = Path(settings.data_dir).resolve()
    changes: dict[str, str] = {}
    if not settings.redis_url:
        redis = EmbeddedRedis(data / "redis", persist=True)
        changes["redis_url"] = redis.start()
        click.echo(f"embedded Redis: {changes['redis_url']} (data in {redis.data_dir})")
    if not settings.db_dsn:
        postgres = EmbeddedPostgres(data / "postgres")
        changes["db_dsn"] = postgres.start()
        click.echo(f"embedded PostgreSQL: {changes['db_dsn']} (data in {postgres.pgdata})")
    # Workers and the reconciler are child processes: they read the same variables.
    os.environ["REDIS_URL"] = changes.get("redis_url", settings.redis_url or "")
    os.environ["DB_DSN"] = changes.get("db_dsn", settings.db_dsn or "")
    return settings.with_overrides(**changes)


async def _migrate(settings: Settings) -> None:
    import asyncpg

    from core.errors import DependencyUnavailable
    from persistence.ledger import ensure_partitions
    from persistence.migrate import migrate
    from persistence.plans import read_catalog_file, seed_missing
    from quota.engine import make_engine

    assert settings.db_dsn is not None
    conn = await asyncpg.connect(settings.db_dsn, timeout=settings.db_timeout_seconds)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    click.echo(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
    engine = make_engine(settings)
    try:
        created = await ensure_partitions(engine.db, datetime.now(tz=UTC),
                                          settings.ledger_partitions_ahead)
        click.echo(f"ledger partitions created ahead: {created}")
        added = await seed_missing(engine.db, read_catalog_file())
        click.echo(f"plans seeded from the catalog file: {', '.join(added) or 'none (present)'}")
        try:
            shards = await engine.loader.sync_catalog()
            click.echo(f"plan catalog copied to {shards} Redis shards")
        except DependencyUnavailable as exc:
            click.echo(f"Redis not reachable, catalog will load on first use: {exc.message}")
    finally:
        await engine.close()


@click.group()
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def main(log_level: str) -> None:
    """Billing and quota gateway."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _exit_on_signal(signum: int, frame: object) -> None:
    # A stop that was asked for and done (uvicorn has drained its requests): status 0, as
    # with several workers, where uvicorn's supervisor returns after stopping them.
    raise SystemExit(0)


@main.command("serve-worker", hidden=True)
@click.option("--factory", required=True, help="the uvicorn factory, module:function")
@click.option("--host", required=True)
@click.option("--port", type=int, required=True)
def serve_worker_command(factory: str, host: str, port: int) -> None:
    """One worker of `serve --workers N` (it starts them; ops/workers.py)."""
    from ops.workers import serve_worker

    serve_worker(factory, host, port)


@main.command()
def migrate() -> None:
    """Apply the schema migrations and seed the plan catalog."""
    settings = ensure_servers(_settings())
    asyncio.run(_migrate(settings))


async def _reconcile(settings: Settings) -> None:
    from lua.cluster import admin_client
    from quota.engine import make_engine
    from reconciler.main import serve_forever

    assert settings.redis_url is not None
    engine = make_engine(settings)
    client = admin_client(settings.redis_url, decode_responses=True,
                                     socket_timeout=max(5.0, settings.flush_block_ms / 500),
                                     socket_connect_timeout=settings.redis_connect_timeout_seconds)
    try:
        await serve_forever(engine, client)
    finally:
        await client.aclose()
        await engine.close()


@main.command()
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on HOST:PORT, 0 for none [env METRICS_PORT]")
def reconcile(metrics_port: int | None) -> None:
    """Run the write-behind reconciler: shard streams -> PostgreSQL ledger.

    SIGTERM or SIGINT: the batch in hand is written and acknowledged, then it exits 0."""
    settings = _settings(metrics_port=metrics_port)
    if not settings.redis_url or not settings.db_dsn:
        raise click.ClickException("reconcile needs REDIS_URL and DB_DSN")
    if settings.metrics_port:
        from core.metrics import serve_metrics

        serve_metrics(settings.host, settings.metrics_port)
        click.echo(f"reconciler metrics on http://{settings.host}:{settings.metrics_port}"
                   "/metrics")
    asyncio.run(_reconcile(settings))


async def _report(settings: Settings, day: date, out: Path) -> int:
    from lua.cluster import admin_client
    from quota.engine import make_engine
    from reconciler.report import run

    assert settings.redis_url is not None
    engine = make_engine(settings)
    client = admin_client(settings.redis_url, decode_responses=True)
    try:
        report = await run(engine, client, day, out)
    finally:
        await client.aclose()
        await engine.close()
    click.echo(f"report {day}: {len(report.totals)} plan/meter totals, "
               f"{report.counters_checked} counters checked, {report.drift_count} drifting, "
               f"flush lag {report.flush_lag_seconds}s; files in {out}")
    return 1 if report.drift_count else 0


def default_report_day(settings: Settings, now: datetime) -> date:
    """The day ``report`` totals without --date: yesterday in TIMEZONE."""
    return (now.astimezone(ZoneInfo(settings.timezone)) - timedelta(days=1)).date()


@main.command()
@click.option("--date", "day", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="The day to total (default: yesterday in TIMEZONE).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write JSON, CSV and HTML [env REPORT_DIR].")
def report(day: datetime | None, out: Path | None) -> None:
    """Nightly reconciliation; exits 1 when Redis and the ledger disagree."""
    settings = _settings()
    if not settings.redis_url or not settings.db_dsn:
        raise click.ClickException("report needs REDIS_URL and DB_DSN")
    chosen = default_report_day(settings, datetime.now(tz=UTC)) if day is None else day.date()
    sys.exit(asyncio.run(_report(settings, chosen, out or Path(settings.report_dir))))


@main.command()
@click.option("--host", default=None, help="Bind address [env HOST, default 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port [env PORT, default 8001]")
@click.option("--workers", type=int, default=None, help="Worker processes [env WORKERS]")
@click.option("--migrate/--no-migrate", "run_migrations", default=False,
              help="Apply migrations before serving.")
@click.option("--with-reconciler", is_flag=True,
              help="Also run the write-behind reconciler as a child process.")
def serve(host: str | None, port: int | None, workers: int | None, run_migrations: bool,
          with_reconciler: bool) -> None:
    """Serve the HTTP API under uvicorn."""
    settings = ensure_servers(_settings(host=host, port=port, workers=workers))
    if run_migrations:
        asyncio.run(_migrate(settings))
    multiproc = None
    # Metrics go to files that /metrics adds up when more than one process counts: several
    # workers, or a reconciler child (its flush lag and batches). Set before any process
    # here imports prometheus_client, which picks its storage at import.
    if (settings.workers > 1 or with_reconciler) \
            and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiproc = tempfile.mkdtemp(prefix="quota-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc
    reconciler = None
    if with_reconciler:  # restarted whenever it exits; gone with this process
        # Its metrics are in this service's /metrics (PROMETHEUS_MULTIPROC_DIR): no listener.
        reconciler = Supervised([sys.executable, "-m", "ops.cli", "reconcile",
                                 "--metrics-port", "0"], "reconciler")
        reconciler.start()
        assert reconciler.process is not None
        click.echo(f"reconciler started (pid {reconciler.process.pid})")
    click.echo(f"serving on http://{settings.host}:{settings.port} "
               f"with {settings.workers} worker(s)")
    # uvicorn shuts down gracefully, then re-raises SIGTERM/SIGINT with the handler it found:
    # make that handler an exit, so the reconciler and embedded servers are stopped below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        run_uvicorn("ops.cli:create_worker_app", settings.host, settings.port,
                    settings.workers)
    finally:
        if reconciler is not None:
            reconciler.stop(15)
        if multiproc:
            shutil.rmtree(multiproc, ignore_errors=True)


# -- operator commands (ops/admin.py) -----------------------------------------------------
main.add_command(dead_letters)
main.add_command(poison)
main.add_command(ledger)
main.add_command(user)
main.add_command(refs_group)


if __name__ == "__main__":  # python -m ops.cli: after every command is defined
    main()
