"""One frozen settings object per process, built once from the environment.

Nothing else in the project reads ``os.environ``: every module receives the values it
needs from here. A missing or invalid value stops start-up with a message naming it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from starlette.config import Config

DEV_SERVICE_TOKEN = "super-secret-dev"  # noqa: S105 - the seed's documented dev default

#: Operations a caller may be allowed. ``read`` covers checks and balances.
SCOPES = frozenset({"read", "debit", "credit", "plans", "admin"})


#: YooKassa's published notification networks (https://yookassa.ru/developers/using-api/webhooks).
YOOKASSA_NETWORKS = (
    "185.71.76.0/27", "185.71.77.0/27", "77.75.153.0/25", "77.75.156.11/32",
    "77.75.156.35/32", "77.75.154.128/25", "2a02:5180::/32",
)


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A named internal caller, its key and the operations it may perform."""

    name: str
    key: str = field(repr=False)
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the service, with its unit in its name where it has one."""

    service_name: str = "billing-tariffication"
    service_version: str = "0.1.0"
    env: str = "development"
    host: str = "127.0.0.1"
    port: int = 8001
    workers: int = 1
    # None means: start an embedded real server (development and tests only).
    redis_url: str | None = None
    db_dsn: str | None = None
    data_dir: str = ".data"
    service_token: str = field(default=DEV_SERVICE_TOKEN, repr=False)
    callers: tuple[Caller, ...] = ()
    timezone: str = "UTC"
    key_prefix: str = "qg"
    n_shards: int = 256
    default_plan: str = "free"
    #: Seed 000's actions and the meter each one debits (ACTION_METERS, JSON object).
    action_meters: tuple[tuple[str, str], ...] = (("chat_tokens", "chat"), ("tpl_run", "template"))
    #: The meter of the balance API (seed 002).
    balance_meter: str = "units"
    idempotency_ttl_seconds: int = 7 * 86400
    counter_grace_seconds: int = 2 * 86400
    user_state_ttl_seconds: int = 30 * 86400
    max_backlog_entries: int = 1_000_000
    max_body_bytes: int = 64 * 1024
    redis_timeout_seconds: float = 2.0
    redis_connect_timeout_seconds: float = 2.0
    redis_connections: int = 1
    db_pool_min: int = 0
    db_pool_max: int = 10
    db_timeout_seconds: float = 5.0
    load_retries: int = 3
    # Write-behind reconciler.
    flush_batch_max: int = 2000
    flush_block_ms: int = 200
    flush_claim_idle_ms: int = 30_000
    flush_max_attempts: int = 5
    report_at: str = ""  # "HH:MM" in TIMEZONE to run the nightly report inside the reconciler
    report_dir: str = "reports"
    # Payments: how a webhook is verified ("signature" or "yookassa") and with what.
    webhook_verifier: str = "signature"
    webhook_public_key: str = field(default="", repr=False)  # PEM text or a path to one
    yookassa_api_url: str = "https://api.yookassa.ru/v3"
    yookassa_shop_id: str = ""
    yookassa_secret_key: str = field(default="", repr=False)
    yookassa_networks: tuple[str, ...] = YOOKASSA_NETWORKS
    trusted_proxies: tuple[str, ...] = ()
    provider_timeout_seconds: float = 5.0

    @property
    def production(self) -> bool:
        """True when the service must refuse development shortcuts."""
        return self.env == "production"

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some values replaced (CLI flags, tests)."""
        return replace(self, **changes)

    def all_callers(self) -> tuple[Caller, ...]:
        """The seed's single service token plus the named callers."""
        service = Caller("service", self.service_token, SCOPES)
        return (service, *self.callers)


def _parse_callers(raw: str) -> tuple[Caller, ...]:
    """CALLER_KEYS: a JSON object ``{"chat-svc": {"key": "...", "scopes": ["debit"]}}``."""
    if not raw.strip():
        return ()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SettingsError(f"CALLER_KEYS is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError("CALLER_KEYS must be a JSON object of caller name -> {key, scopes}")
    callers = []
    for name, spec in data.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            # recorded with every operation (ledger events are joined by a control char)
            raise SettingsError(f"CALLER_KEYS name {name!r} must be 1 to 64 letters, digits, "
                                "'_', '.' or '-'")
        if not isinstance(spec, dict) or not isinstance(spec.get("key"), str):
            raise SettingsError(f"CALLER_KEYS[{name!r}] needs a string 'key'")
        if len(spec["key"]) < 16:
            raise SettingsError(f"CALLER_KEYS[{name!r}].key must be at least 16 characters")
        scopes = frozenset(spec.get("scopes", ["read"]))
        unknown = scopes - SCOPES
        if unknown:
            raise SettingsError(f"CALLER_KEYS[{name!r}] has unknown scopes {sorted(unknown)}")
        callers.append(Caller(str(name), spec["key"], scopes))
    return tuple(callers)


def _parse_actions(raw: str) -> tuple[tuple[str, str], ...]:
    """ACTION_METERS: a JSON object ``{"chat_tokens": "chat"}``; empty keeps the default."""
    if not raw.strip():
        return Settings().action_meters
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SettingsError(f"ACTION_METERS is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise SettingsError("ACTION_METERS must be a JSON object of action -> meter")
    return tuple(sorted(data.items()))


def _parse_networks(name: str, raw: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of addresses or CIDR networks; empty keeps the default."""
    if not raw.strip():
        return default
    networks = tuple(part.strip() for part in raw.split(",") if part.strip())
    for net in networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise SettingsError(f"{name}: {net!r} is not an address or network") from None
    return networks


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings from the environment (the only reader of it)."""
    config = Config(environ=dict(os.environ if environ is None else environ))
    defaults = Settings()
    try:
        settings = Settings(
            service_name=config("SERVICE_NAME", default=defaults.service_name),
            service_version=config("SERVICE_VERSION", default=defaults.service_version),
            env=config("ENV", default=defaults.env),
            host=config("HOST", default=defaults.host),
            port=config("PORT", cast=int, default=defaults.port),
            workers=config("WORKERS", cast=int, default=defaults.workers),
            redis_url=config("REDIS_URL", default=None) or None,
            db_dsn=_dsn(config("DB_DSN", default=None) or None),
            data_dir=config("DATA_DIR", default=defaults.data_dir),
            service_token=config("SERVICE_TOKEN", default=DEV_SERVICE_TOKEN),
            callers=_parse_callers(config("CALLER_KEYS", default="")),
            timezone=config("TIMEZONE", default=defaults.timezone),
            key_prefix=config("KEY_PREFIX", default=defaults.key_prefix),
            n_shards=config("N_SHARDS", cast=int, default=defaults.n_shards),
            default_plan=config("DEFAULT_PLAN", default=defaults.default_plan),
            action_meters=_parse_actions(config("ACTION_METERS", default="")),
            balance_meter=config("BALANCE_METER", default=defaults.balance_meter),
            idempotency_ttl_seconds=config(
                "IDEMPOTENCY_TTL_SECONDS", cast=int, default=defaults.idempotency_ttl_seconds
            ),
            counter_grace_seconds=config(
                "COUNTER_GRACE_SECONDS", cast=int, default=defaults.counter_grace_seconds
            ),
            user_state_ttl_seconds=config(
                "USER_STATE_TTL_SECONDS", cast=int, default=defaults.user_state_ttl_seconds
            ),
            max_backlog_entries=config(
                "MAX_BACKLOG_ENTRIES", cast=int, default=defaults.max_backlog_entries
            ),
            redis_timeout_seconds=config(
                "REDIS_TIMEOUT_SECONDS", cast=float, default=defaults.redis_timeout_seconds
            ),
            redis_connections=config(
                "REDIS_CONNECTIONS", cast=int, default=defaults.redis_connections
            ),
            db_pool_max=config("DB_POOL_MAX", cast=int, default=defaults.db_pool_max),
            db_timeout_seconds=config(
                "DB_TIMEOUT_SECONDS", cast=float, default=defaults.db_timeout_seconds
            ),
            flush_batch_max=config("FLUSH_BATCH_MAX", cast=int, default=defaults.flush_batch_max),
            flush_block_ms=config("FLUSH_BLOCK_MS", cast=int, default=defaults.flush_block_ms),
            flush_claim_idle_ms=config(
                "FLUSH_CLAIM_IDLE_MS", cast=int, default=defaults.flush_claim_idle_ms
            ),
            report_at=config("REPORT_AT", default=defaults.report_at),
            report_dir=config("REPORT_DIR", default=defaults.report_dir),
            webhook_verifier=config("WEBHOOK_VERIFIER", default=defaults.webhook_verifier),
            webhook_public_key=config("WEBHOOK_PUBLIC_KEY", default=""),
            yookassa_api_url=config("YOOKASSA_API_URL", default=defaults.yookassa_api_url),
            yookassa_shop_id=config("YOOKASSA_SHOP_ID", default=""),
            yookassa_secret_key=config("YOOKASSA_SECRET_KEY", default=""),
            yookassa_networks=_parse_networks(
                "YOOKASSA_NETWORKS", config("YOOKASSA_NETWORKS", default=""), YOOKASSA_NETWORKS
            ),
            trusted_proxies=_parse_networks(
                "TRUSTED_PROXIES", config("TRUSTED_PROXIES", default=""), ()
            ),
            provider_timeout_seconds=config(
                "PROVIDER_TIMEOUT_SECONDS", cast=float, default=defaults.provider_timeout_seconds
            ),
        )
    except ValueError as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"invalid configuration value: {exc}") from None
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    """Reject values that cannot work; the message names the variable."""
    for name in (
        "port", "workers", "n_shards", "idempotency_ttl_seconds", "counter_grace_seconds",
        "user_state_ttl_seconds", "max_backlog_entries", "redis_timeout_seconds",
        "redis_connections", "db_pool_max", "db_timeout_seconds", "flush_batch_max",
        "flush_block_ms", "flush_claim_idle_ms", "provider_timeout_seconds",
    ):
        _positive(name.upper(), getattr(settings, name))
    if settings.port > 65535:
        raise SettingsError(f"PORT must be at most 65535, got {settings.port}")
    if settings.n_shards > 16384:
        raise SettingsError("N_SHARDS must be at most 16384 (one per Redis Cluster slot)")
    if settings.env not in ("development", "test", "production"):
        raise SettingsError("ENV must be development, test or production")
    try:
        zoneinfo.ZoneInfo(settings.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"TIMEZONE {settings.timezone!r} is not a known IANA zone") from None
    if not settings.key_prefix or any(c in settings.key_prefix for c in "{} \t\r\n"):
        raise SettingsError("KEY_PREFIX must be non-empty, without braces or spaces")
    if settings.report_at and not _is_hhmm(settings.report_at):
        raise SettingsError("REPORT_AT must be HH:MM")
    if settings.webhook_verifier not in ("signature", "yookassa"):
        raise SettingsError("WEBHOOK_VERIFIER must be signature or yookassa")
    if settings.production:
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


def _dsn(value: str | None) -> str | None:
    """DB_DSN as asyncpg takes it: the seed's SQLAlchemy form ``postgresql+asyncpg://``
    names the driver in the scheme, which asyncpg does not read."""
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise SettingsError("DB_DSN must be a postgresql:// URL, e.g. "
                            "postgresql://user:password@host:5432/billing_db")
    return f"postgresql://{rest}"


def _is_hhmm(value: str) -> bool:
    hh, _, mm = value.partition(":")
    return hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60
