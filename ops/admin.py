"""The operator's commands: payment notifications kept as dead letters (list, show, fix
and replay), notifications refused by the verifier (rejections), and ledger entries the
reconciler set aside (poison: list, show, replay once the cause is fixed); the ledger's
partitions (list, prune)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from core.settings import Settings
from ops.config import settings_or_exit, with_servers

if TYPE_CHECKING:
    from payments.webhook import PaymentWebhook
    from reconciler.poison import Poison

T = TypeVar("T")


@click.group("dead-letters")
def dead_letters() -> None:
    """Payment notifications that could not be processed: list, show, replay."""


async def _with_webhook(settings: Settings, action: Callable[[PaymentWebhook], Awaitable[T]]
                        ) -> T:
    from payments.credits import Payments
    from payments.verifiers import make_verifier
    from payments.webhook import PaymentWebhook
    from quota.engine import make_engine

    engine = make_engine(settings)
    webhook = PaymentWebhook(Payments(engine), make_verifier(settings))
    try:
        return await action(webhook)
    finally:
        await webhook.verifier.aclose()
        await engine.close()


def _dead_letter_settings() -> Settings:
    return with_servers("dead-letters")


@dead_letters.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include the ones already replayed.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
def dead_letters_list(show_all: bool, limit: int) -> None:
    """Newest first: id, time, status, size, sender, reason."""
    async def run(webhook: PaymentWebhook) -> list[Any]:
        return await webhook.db.fetch("list_dead_letters", show_all, limit)

    rows = asyncio.run(_with_webhook(_dead_letter_settings(), run))
    if not rows:
        click.echo("no dead letters" + ("" if show_all else " waiting"))
    for r in rows:
        click.echo(f"{r['id']}\t{r['received_at']:%Y-%m-%d %H:%M:%S%z}\t{r['status']}\t"
                   f"{r['size']} B\t{r['sender'] or '-'}\t{r['reason']}")


@dead_letters.command("show")
@click.argument("dead_letter_id", type=int)
def dead_letters_show(dead_letter_id: int) -> None:
    """One dead letter as JSON: headers, sender, reason and the body as received."""
    import base64

    import orjson

    async def run(webhook: PaymentWebhook) -> Any:
        return await webhook.db.fetchrow("get_dead_letter", dead_letter_id)

    row = asyncio.run(_with_webhook(_dead_letter_settings(), run))
    if row is None:
        raise click.ClickException(f"no dead letter {dead_letter_id}")
    body = bytes(row["body"])
    try:
        shown: dict[str, str] = {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        shown = {"body_base64": base64.b64encode(body).decode()}
    data = {"id": row["id"], "received_at": row["received_at"].isoformat(),
            "source": row["source"], "sender": row["sender"], "status": row["status"],
            "reason": row["reason"], "replay_result": row["replay_result"],
            "headers": row["headers"], **shown}
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@dead_letters.command("replay")
@click.argument("dead_letter_id", type=int)
@click.option("--body", "body_file", type=click.Path(exists=True, dir_okay=False,
                                                      path_type=Path),
              help="Replay this fixed body instead of the stored one.")
@click.option("--no-verify", is_flag=True,
              help="Skip the signature or sender check and the provider refetch: the "
                   "operator vouches for the body (needed after editing a signed body).")
def dead_letters_replay(dead_letter_id: int, body_file: Path | None, no_verify: bool) -> None:
    """Process a dead letter again; exit 1 if it is rejected again."""
    from core.errors import QuotaError

    body = body_file.read_bytes() if body_file else None

    async def run(webhook: PaymentWebhook) -> str:
        outcome = await webhook.replay(dead_letter_id, body, verify=not no_verify)
        return f"{outcome.status}: {outcome.event} order {outcome.order_id}"

    try:
        click.echo(asyncio.run(_with_webhook(_dead_letter_settings(), run)))
    except QuotaError as exc:
        click.echo(f"not processed: {exc.code}: {exc.message}", err=True)
        sys.exit(1)




@dead_letters.command("rejections")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
def dead_letters_rejections(limit: int) -> None:
    """Notifications refused by the verifier, newest first: id, time, sender, size, body
    SHA-256, reason (only a record is kept of these, never the body)."""
    async def run(webhook: PaymentWebhook) -> list[Any]:
        return await webhook.db.fetch("list_webhook_rejections", limit)

    rows = asyncio.run(_with_webhook(_dead_letter_settings(), run))
    if not rows:
        click.echo("no rejections recorded")
    for r in rows:
        click.echo(f"{r['id']}\t{r['received_at']:%Y-%m-%d %H:%M:%S%z}\t{r['sender'] or '-'}\t"
                   f"{r['size']} B\t{r['body_sha256']}\t{r['reason']}")


# -- poisoned ledger entries ---------------------------------------------------------------
@click.group("poison")
def poison() -> None:
    """Ledger entries the reconciler set aside: list, show, replay once the cause is fixed."""


async def _with_poison(action: Callable[[Poison], Awaitable[T]]) -> T:
    from persistence.db import Database
    from reconciler.poison import Poison

    settings = with_servers("poison")
    assert settings.db_dsn is not None
    db = Database(settings.db_dsn, min_size=0, max_size=2, timeout=settings.db_timeout_seconds)
    try:
        return await action(Poison(db, timedelta(seconds=settings.idempotency_ttl_seconds)))
    finally:
        await db.close()


@poison.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include the ones already replayed.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
def poison_list(show_all: bool, limit: int) -> None:
    """Newest first: id, time, shard and stream id, kind, tx, user, error."""
    from reconciler.poison import summary

    async def run(store: Poison) -> list[Any]:
        return await store.list(include_replayed=show_all, limit=limit)

    rows = asyncio.run(_with_poison(run))
    if not rows:
        click.echo("no poisoned entries" + ("" if show_all else " waiting"))
    for r in rows:
        about = summary(dict(r["fields"]))
        done = f"\treplayed: {r['replay_result']}" if r["replayed_at"] else ""
        click.echo(f"{r['id']}\t{r['created_at']:%Y-%m-%d %H:%M:%S%z}\t{r['shard']}/"
                   f"{r['stream_id']}\t{about.get('kind', '?')}\t{about.get('tx_id', '?')}\t"
                   f"{about.get('user_id', '?')}\t{r['error']}{done}")


@poison.command("show")
@click.argument("poison_id", type=int)
def poison_show(poison_id: int) -> None:
    """One poisoned entry as JSON: its stream fields, error and replay state."""
    import orjson

    from core.errors import NotFound
    from reconciler.poison import summary

    async def run(store: Poison) -> Any:
        return await store.show(poison_id)

    try:
        row = asyncio.run(_with_poison(run))
    except NotFound as exc:
        raise click.ClickException(exc.message) from None
    data = {"id": row["id"], "shard": row["shard"], "stream_id": row["stream_id"],
            "created_at": row["created_at"].isoformat(), "error": row["error"],
            "fields": row["fields"], "event": summary(dict(row["fields"])),
            "replayed_at": row["replayed_at"].isoformat() if row["replayed_at"] else None,
            "replay_result": row["replay_result"]}
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@poison.command("replay")
@click.argument("poison_id", type=int)
def poison_replay(poison_id: int) -> None:
    """Write a poisoned entry to the ledger once its cause is fixed (idempotent on tx_id:
    one already there is a duplicate); exit 1 if it is refused again."""
    from core.errors import NotFound, QuotaError

    async def run(store: Poison) -> Any:
        return await store.replay(poison_id)

    try:
        done = asyncio.run(_with_poison(run))
    except NotFound as exc:
        raise click.ClickException(exc.message) from None
    except QuotaError as exc:
        click.echo(f"not replayed: {exc.code}: {exc.message}", err=True)
        sys.exit(1)
    if done.outcome == "refused":
        click.echo(f"not replayed: {done.detail}", err=True)
        sys.exit(1)
    click.echo(f"{done.outcome}: poisoned entry {poison_id}")


# -- one user ------------------------------------------------------------------------------
@click.group("user")
def user() -> None:
    """One user's state, for an operator answering "why was this debit refused"."""


@user.command("show")
@click.argument("user_id")
def user_show(user_id: str) -> None:
    """The user in Redis next to PostgreSQL: plan, credits, period usage, unflushed events,
    idempotency keys (JSON)."""
    import orjson

    from lua.cluster import admin_client
    from ops.inspect import user_state
    from quota.engine import make_engine

    settings = with_servers("user show")
    assert settings.redis_url is not None

    async def run() -> dict[str, Any]:
        engine = make_engine(settings)
        client = admin_client(settings.redis_url or "", decode_responses=True)
        try:
            return await user_state(engine, client, user_id)
        finally:
            await client.aclose()
            await engine.close()

    click.echo(orjson.dumps(asyncio.run(run()), option=orjson.OPT_INDENT_2).decode())


# -- upgrades ------------------------------------------------------------------------------
@click.group("refs")
def refs_group() -> None:
    """Idempotency records in Redis."""


@refs_group.command("convert")
def refs_convert() -> None:
    """Put the debits that builds before the ref buckets remembered as `<user>:r:<ref>`
    strings into their buckets (from their ledger rows) and delete the strings; run it
    when upgrading from such a build, after its reconciler has flushed, and again until
    nothing is left waiting (docs/operations.md, "Upgrade")."""
    from lua.cluster import admin_client
    from ops.upgrade import convert_legacy_refs
    from quota.engine import make_engine

    settings = with_servers("refs convert")

    async def run() -> Any:
        engine = make_engine(settings)
        client = admin_client(settings.redis_url or "", decode_responses=True)
        try:
            return await convert_legacy_refs(engine, client)
        finally:
            await client.aclose()
            await engine.close()

    done = asyncio.run(run())
    click.echo(f"converted {done.converted}, past their TTL {done.expired}, "
               f"waiting for the reconciler {len(done.waiting)}")
    if done.waiting:
        raise SystemExit(1)


# -- the ledger's partitions ---------------------------------------------------------------
@click.group("ledger")
def ledger() -> None:
    """The ledger's monthly partitions: list, create ahead, prune past the retention."""


def _ledger_db() -> tuple[Settings, Any]:
    from persistence.db import Database

    settings = settings_or_exit()
    if not settings.db_dsn:
        raise click.ClickException("ledger needs DB_DSN")
    return settings, Database(settings.db_dsn, min_size=0, max_size=1,
                              timeout=settings.db_timeout_seconds)


@ledger.command("partitions")
def ledger_partitions() -> None:
    """Create this month's partition and LEDGER_PARTITIONS_AHEAD more if missing, then list
    every partition with its bounds, estimated rows and size."""
    from datetime import UTC, datetime

    from persistence.ledger import ensure_partitions

    settings, db = _ledger_db()

    async def run() -> tuple[int, list[Any]]:
        try:
            created = await ensure_partitions(db, datetime.now(tz=UTC),
                                              settings.ledger_partitions_ahead)
            return created, await db.fetch("ledger_partitions")
        finally:
            await db.close()

    created, rows = asyncio.run(run())
    click.echo(f"partitions created: {created}")
    for r in rows:
        click.echo(f"{r['name']}\t{r['bounds']}\t~{max(r['rows_estimate'], 0)} rows\t"
                   f"{r['bytes']} bytes")


@ledger.command("prune")
@click.option("--retention-days", type=int, default=None,
              help="Override LEDGER_RETENTION_DAYS (checked the same way).")
def ledger_prune(retention_days: int | None) -> None:
    """Roll up into daily totals and drop the monthly partitions of raw debits that ended
    more than LEDGER_RETENTION_DAYS ago (idempotent; the reconciler does it hourly)."""
    from datetime import UTC, datetime

    from persistence.ledger import prune

    settings, db = _ledger_db()
    if retention_days is not None:
        settings = settings_or_exit(ledger_retention_days=retention_days)
    if not settings.ledger_retention_days:
        raise click.ClickException("LEDGER_RETENTION_DAYS is 0: raw rows are kept for good")

    async def run() -> list[str]:
        try:
            return await prune(db, datetime.now(tz=UTC), settings.ledger_retention_days,
                               settings.timezone)
        finally:
            await db.close()

    dropped = asyncio.run(run())
    click.echo(f"rolled up and dropped: {', '.join(dropped) or 'none (nothing that old)'}")
