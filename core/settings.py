"""One frozen settings object per process, built once from the environment.

Every knob is declared once, in ``Settings``, with its type, default and limits; each is
read from the variable named by its upper-cased field name (``callers`` from CALLER_KEYS)
and converted by msgspec. Nothing else in the project reads ``os.environ``. A missing or
invalid value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, get_args

import msgspec
import orjson

from core.ids import ACTION_PATTERN, METER_PATTERN

DEV_SERVICE_TOKEN = "super-secret-dev"  # noqa: S105 - the seed's documented dev default

Scope = Literal["read", "debit", "credit", "plans", "admin"]
#: Operations a caller may be allowed. ``read`` covers checks and balances.
SCOPES: frozenset[Scope] = frozenset(get_args(Scope))

#: YooKassa's published notification networks (https://yookassa.ru/developers/using-api/webhooks).
YOOKASSA_NETWORKS = (
    "185.71.76.0/27", "185.71.77.0/27", "77.75.153.0/25", "77.75.156.11/32",
    "77.75.156.35/32", "77.75.154.128/25", "2a02:5180::/32",
)

DAY_SECONDS = 86400
YEAR_SECONDS = 366 * DAY_SECONDS
#: Limits shared by several knobs.
Seconds = Annotated[float, msgspec.Meta(gt=0, le=300)]  # a network timeout
TtlSeconds = Annotated[int, msgspec.Meta(ge=1, le=YEAR_SECONDS)]
PoolSize = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Network = Annotated[str, msgspec.Meta(min_length=1)]
#: Caller names are recorded with every operation (ledger events are joined by a control
#: character), so they are short and plain.
CallerName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

#: Fields whose values are never shown by ``repr``.
SECRET_FIELDS = frozenset({"service_token", "webhook_public_key", "yookassa_secret_key"})
#: Fields that may carry a password, shown without it.
URL_FIELDS = frozenset({"redis_url", "db_dsn"})
#: Fields read from a variable not named after them.
VARIABLES = {"callers": "CALLER_KEYS"}
JSON_FIELDS = frozenset({"callers", "action_meters"})
LIST_FIELDS = ("yookassa_networks", "trusted_proxies")
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")
_VALIDATION_PATH = re.compile(r"(?P<message>.*) - at `\$\.(?P<field>\w+)(?P<rest>.*)`", re.S)
_HH_MM = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names it."""


class Caller(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named internal caller, its key and the operations it may perform."""

    name: CallerName
    key: Annotated[str, msgspec.Meta(min_length=16)]
    scopes: frozenset[Scope] = frozenset({"read"})

    def __repr__(self) -> str:
        return f"Caller(name={self.name!r}, scopes={sorted(self.scopes)!r})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("name", self.name), ("scopes", sorted(self.scopes))]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the service, with its unit in its name where it has one."""

    service_name: str = "billing-tariffication"
    service_version: str = "0.1.0"
    env: Literal["development", "test", "production"] = "development"
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8001
    workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    #: The Prometheus listener of a reconciler run on its own (``reconcile``), on HOST;
    #: 0: none (the reconciler of ``serve --with-reconciler`` reports in its /metrics).
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    #: None means: start an embedded real server (development and tests only).
    redis_url: str | None = None
    db_dsn: str | None = None
    data_dir: str = ".data"
    service_token: str = DEV_SERVICE_TOKEN
    callers: tuple[Caller, ...] = ()
    timezone: str = "UTC"
    key_prefix: str = "qg"
    #: Virtual shards, at most one per Redis Cluster slot; fixed per deployment.
    n_shards: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 256
    default_plan: str = "free"
    #: Seed 000's actions and the meter each one debits (ACTION_METERS, JSON object).
    action_meters: tuple[tuple[str, str], ...] = (("chat_tokens", "chat"), ("tpl_run", "template"))
    #: The meter of the balance API (seed 002).
    balance_meter: str = "units"
    idempotency_ttl_seconds: TtlSeconds = 7 * DAY_SECONDS
    counter_grace_seconds: TtlSeconds = 2 * DAY_SECONDS
    user_state_ttl_seconds: TtlSeconds = 30 * DAY_SECONDS
    #: A user PostgreSQL knows nothing of (a read of a never-seen id) stays this briefly.
    unknown_user_ttl_seconds: TtlSeconds = 60
    #: Unflushed ledger entries in all shards before debits answer 503; 0: derived from
    #: Redis's maxmemory (quota/backlog.py).
    max_backlog_entries: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)] = 0
    #: The flush lag past which /ready and quota_ledger_oldest_seconds say so.
    flush_lag_alert_seconds: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    #: The most debits one batch request may carry.
    batch_max_items: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    #: Holds (reservations): the longest a hold may live (reserve and extend), the TTL of a
    #: reserve that gives none, the most open holds a user may have, and how often the
    #: reconciler expires the holds of users no request touches.
    hold_max_ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=7 * DAY_SECONDS)] = 3600
    hold_default_ttl_seconds: Annotated[int, msgspec.Meta(ge=1, le=7 * DAY_SECONDS)] = 300
    hold_max_open: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    hold_sweep_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    redis_timeout_seconds: Seconds = 2.0
    redis_connect_timeout_seconds: Seconds = 2.0
    redis_connections: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    #: WAIT for this many replicas after write-through changes (credits, refunds, plan
    #: assignments), at most as many as a node has had connected; 0: never WAIT.
    redis_wait_replicas: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1
    #: How long a WAIT may take, ms (under REDIS_TIMEOUT_SECONDS).
    redis_wait_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 100
    #: WAIT after debits too (one WAIT per batch call of a connection).
    redis_wait_debits: bool = False
    db_pool_min: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    db_pool_max: PoolSize = 10
    db_timeout_seconds: Seconds = 5.0
    #: Attempts at loading a user's state into Redis before answering 503.
    load_retries: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # Write-behind reconciler.
    flush_batch_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 2000
    flush_block_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 200
    #: After a small batch (under a quarter of FLUSH_BATCH_MAX), how long the reconciler
    #: lets the streams fill before it reads again, ms (0: at once).
    flush_linger_ms: Annotated[int, msgspec.Meta(ge=0, le=5_000)] = 100
    flush_claim_idle_ms: Annotated[int, msgspec.Meta(ge=1, le=DAY_SECONDS * 1000)] = 30_000
    #: "H:MM" or "HH:MM" in TIMEZONE to run the nightly report inside the reconciler.
    report_at: str = ""
    report_dir: str = "reports"
    # The ledger at volume (persistence/sql/migrations/0012_ledger_partitions.sql).
    #: Days raw debit (and hold) rows are kept before their month is rolled up into daily
    #: per-user rollups and dropped; 0 keeps them for good. At least the idempotency TTL
    #: and two days (the nightly report reads yesterday's rows).
    ledger_retention_days: Annotated[int, msgspec.Meta(ge=0, le=36_600)] = 0
    #: Monthly ledger partitions created ahead of the current month.
    ledger_partitions_ahead: Annotated[int, msgspec.Meta(ge=1, le=24)] = 2
    # Payments: how a webhook is verified and with what.
    webhook_verifier: Literal["signature", "yookassa"] = "signature"
    webhook_public_key: str = ""  # PEM text or a path to one
    yookassa_api_url: str = "https://api.yookassa.ru/v3"
    yookassa_shop_id: str = ""
    yookassa_secret_key: str = ""
    yookassa_networks: tuple[Network, ...] = YOOKASSA_NETWORKS
    trusted_proxies: tuple[Network, ...] = ()
    provider_timeout_seconds: Seconds = 5.0

    @property
    def production(self) -> bool:
        """True when the service must refuse development shortcuts."""
        return self.env == "production"

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some values replaced (CLI flags, tests); ``validate`` checks it."""
        return msgspec.structs.replace(self, **changes)

    def all_callers(self) -> tuple[Caller, ...]:
        """The seed's single service token plus the named callers."""
        service = Caller("service", self.service_token, SCOPES)
        return (service, *self.callers)

    def _shown(self) -> Iterator[tuple[str, Any]]:
        """The fields as ``repr`` shows them: no secrets, no URL passwords."""
        for name in self.__struct_fields__:
            if name in SECRET_FIELDS:
                continue
            value = getattr(self, name)
            if name in URL_FIELDS and value:
                value = _URL_PASSWORD.sub(r"\1***@", value)
            yield name, value

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self._shown())})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return list(self._shown())


def variable(field: str) -> str:
    """The environment variable a settings field is read from."""
    return VARIABLES.get(field, field.upper())


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings from the environment (the only reader of it)."""
    raw = read_environment(os.environ if environ is None else environ)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise _naming(exc, raw) from None
    validate(settings)
    return settings


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The raw value of every field whose variable is set and not empty."""
    raw: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        name = variable(field)
        value = environ.get(name, "")
        if not value.strip():
            continue  # unset or empty: the default
        if field in JSON_FIELDS:
            raw[field] = _json_object(name, value)
        elif field in LIST_FIELDS:
            raw[field] = [part.strip() for part in value.split(",") if part.strip()]
        elif field == "db_dsn":
            raw[field] = _dsn(value)
        else:
            raw[field] = value
    if "callers" in raw:
        raw["callers"] = [_caller_spec(name, spec) for name, spec in raw["callers"].items()]
    if "action_meters" in raw:
        raw["action_meters"] = sorted(raw["action_meters"].items())
    return raw


def _json_object(name: str, value: str) -> dict[str, Any]:
    """CALLER_KEYS ``{"chat-svc": {"key": "...", "scopes": ["debit"]}}`` or ACTION_METERS
    ``{"chat_tokens": "chat"}``: a JSON object."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise SettingsError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{name} must be a JSON object")
    return data


def _caller_spec(name: str, spec: object) -> dict[str, Any]:
    """One CALLER_KEYS entry as Caller's fields."""
    if not isinstance(spec, dict):
        raise SettingsError(f"CALLER_KEYS[{name!r}] must be an object with a key and scopes")
    return {**spec, "name": name}


def _dsn(value: str) -> str:
    """DB_DSN as asyncpg takes it: the seed's SQLAlchemy form ``postgresql+asyncpg://``
    names the driver in the scheme, which asyncpg does not read."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise SettingsError("DB_DSN must be a postgresql:// URL, e.g. "
                            "postgresql://user:password@host:5432/billing_db")
    return f"postgresql://{rest}"


def _naming(exc: msgspec.ValidationError, raw: Mapping[str, Any]) -> SettingsError:
    """msgspec's "... - at `$.port`" as a message naming the variable (PORT)."""
    found = _VALIDATION_PATH.fullmatch(str(exc))
    if found is None:
        return SettingsError(f"invalid configuration: {exc}")
    field, rest = found["field"], found["rest"]
    where = variable(field)
    index = re.match(r"\[(\d+)\]", rest)
    if field == "callers" and index:  # name the caller, never show its key
        where += f"[{raw['callers'][int(index[1])]['name']!r}]" + rest[index.end():]
    elif not rest and field not in SECRET_FIELDS | URL_FIELDS:
        where += f" {raw[field]!r}"
    return SettingsError(f"{where}: {found['message']}")


def report_time(value: str) -> tuple[int, int] | None:
    """REPORT_AT ("H:MM" or "HH:MM") as (hour, minute); None when empty (no report)."""
    if not value:
        return None
    found = _HH_MM.fullmatch(value)
    if found is None:
        raise SettingsError(f"REPORT_AT must be H:MM or HH:MM (00:00 to 23:59), got {value!r}")
    return int(found[1]), int(found[2])


def validate(settings: Settings) -> None:
    """Reject values that cannot work, whoever built them; the message names the variable."""
    values = msgspec.to_builtins(settings)
    try:  # the declared limits, also for Settings(...) and with_overrides(...)
        msgspec.convert(values, Settings)
    except msgspec.ValidationError as exc:
        raise _naming(exc, values) from None
    try:
        zoneinfo.ZoneInfo(settings.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"TIMEZONE {settings.timezone!r} is not a known IANA zone") from None
    if not settings.key_prefix or any(c in settings.key_prefix for c in "{} \t\r\n"):
        raise SettingsError("KEY_PREFIX must be non-empty, without braces or spaces")
    report_time(settings.report_at)
    for action, meter in settings.action_meters:  # an action no request could name
        if not ACTION_PATTERN.fullmatch(action) or not METER_PATTERN.fullmatch(meter):
            raise SettingsError(f"ACTION_METERS: {action!r} -> {meter!r}: actions must match "
                                f"^{ACTION_PATTERN.pattern}$ and meters "
                                f"^{METER_PATTERN.pattern}$")
    retention = settings.ledger_retention_days * DAY_SECONDS
    if retention and retention < max(settings.idempotency_ttl_seconds, 2 * DAY_SECONDS):
        raise SettingsError(
            f"LEDGER_RETENTION_DAYS ({settings.ledger_retention_days}) must cover the "
            f"idempotency TTL ({settings.idempotency_ttl_seconds} s: a lost key is restored "
            "from raw debits) and 2 days (the nightly report reads yesterday's), or be 0")
    if settings.hold_default_ttl_seconds > settings.hold_max_ttl_seconds:
        raise SettingsError(f"HOLD_DEFAULT_TTL_SECONDS ({settings.hold_default_ttl_seconds}) "
                            f"must not exceed HOLD_MAX_TTL_SECONDS "
                            f"({settings.hold_max_ttl_seconds})")
    if settings.hold_max_ttl_seconds >= settings.user_state_ttl_seconds:
        raise SettingsError(f"HOLD_MAX_TTL_SECONDS ({settings.hold_max_ttl_seconds}) must be "
                            f"shorter than USER_STATE_TTL_SECONDS "
                            f"({settings.user_state_ttl_seconds}): a user's state outlives "
                            "its holds")
    if settings.redis_wait_timeout_ms >= settings.redis_timeout_seconds * 1000 / 2:
        raise SettingsError(f"REDIS_WAIT_TIMEOUT_MS ({settings.redis_wait_timeout_ms}) must be "
                            f"under half of REDIS_TIMEOUT_SECONDS "
                            f"({settings.redis_timeout_seconds} s): calls pipelined behind "
                            "a WAIT answer after it")
    if settings.db_pool_min > settings.db_pool_max:
        raise SettingsError(f"DB_POOL_MIN ({settings.db_pool_min}) must not exceed "
                            f"DB_POOL_MAX ({settings.db_pool_max})")
    for field in LIST_FIELDS:
        for net in getattr(settings, field):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise SettingsError(f"{variable(field)}: {net!r} is not an address or "
                                    "network") from None
    if settings.production:
        _validate_production(settings)


def _validate_production(settings: Settings) -> None:
    """ENV=production refuses development shortcuts and a webhook verifier without keys."""
    if settings.service_token == DEV_SERVICE_TOKEN:
        raise SettingsError("ENV=production refuses the development SERVICE_TOKEN")
    if len(settings.service_token) < 16:
        raise SettingsError("SERVICE_TOKEN must be at least 16 characters in production")
    if not settings.redis_url or not settings.db_dsn:
        raise SettingsError(
            "ENV=production needs REDIS_URL and DB_DSN: embedded servers are for development"
        )
    if settings.webhook_verifier == "signature" and not settings.webhook_public_key:
        raise SettingsError("ENV=production with WEBHOOK_VERIFIER=signature needs "
                            "WEBHOOK_PUBLIC_KEY")
    if settings.webhook_verifier == "yookassa" and not (
        settings.yookassa_shop_id and settings.yookassa_secret_key
    ):
        raise SettingsError("ENV=production with WEBHOOK_VERIFIER=yookassa needs "
                            "YOOKASSA_SHOP_ID and YOOKASSA_SECRET_KEY")
