"""Settings: every field read from its variable, limits named, secrets kept out of repr."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from core.settings import (
    DEV_SERVICE_TOKEN,
    Caller,
    Settings,
    SettingsError,
    load_settings,
    report_time,
    validate,
    variable,
)
from ops.cli import default_report_day

SECRET_KEY = "caller-key-0123456789-secret"
#: A value other than the default for every field, as its variable spells it.
SAMPLES: dict[str, tuple[str, object]] = {
    "service_name": ("billing-2", "billing-2"),
    "service_version": ("9.9.9", "9.9.9"),
    "env": ("test", "test"),
    "host": ("0.0.0.0", "0.0.0.0"),  # noqa: S104 - a value, not a bind
    "port": ("9001", 9001),
    "workers": ("4", 4),
    "metrics_port": ("9101", 9101),
    "redis_url": ("redis://r:6379/1", "redis://r:6379/1"),
    "db_dsn": ("postgresql+asyncpg://u:p@h/d", "postgresql://u:p@h/d"),
    "data_dir": ("/var/qg", "/var/qg"),
    "service_token": ("another-service-token", "another-service-token"),
    "callers": ('{"chat-svc": {"key": "' + SECRET_KEY + '", "scopes": ["debit"]}}',
                (Caller("chat-svc", SECRET_KEY, frozenset({"debit"})),)),
    "timezone": ("Europe/Moscow", "Europe/Moscow"),
    "key_prefix": ("qg2", "qg2"),
    "n_shards": ("64", 64),
    "default_plan": ("basic", "basic"),
    "action_meters": ('{"tpl_run": "template", "chat_tokens": "chat", "img": "image"}',
                      (("chat_tokens", "chat"), ("img", "image"), ("tpl_run", "template"))),
    "balance_meter": ("credits", "credits"),
    "idempotency_ttl_seconds": ("3600", 3600),
    "counter_grace_seconds": ("7200", 7200),
    "user_state_ttl_seconds": ("86400", 86400),
    "unknown_user_ttl_seconds": ("30", 30),
    "max_backlog_entries": ("5000", 5000),
    "flush_lag_alert_seconds": ("15", 15.0),
    "max_body_bytes": ("2048", 2048),
    "batch_max_items": ("250", 250),
    "hold_max_ttl_seconds": ("7200", 7200),
    "hold_default_ttl_seconds": ("120", 120),
    "hold_max_open": ("20", 20),
    "hold_sweep_seconds": ("0.5", 0.5),
    "redis_timeout_seconds": ("0.5", 0.5),
    "redis_connect_timeout_seconds": ("1.5", 1.5),
    "redis_connections": ("4", 4),
    "redis_wait_replicas": ("2", 2),
    "redis_wait_timeout_ms": ("250", 250),
    "redis_wait_debits": ("true", True),
    "db_pool_min": ("2", 2),
    "db_pool_max": ("20", 20),
    "db_timeout_seconds": ("7", 7.0),
    "load_retries": ("5", 5),
    "flush_batch_max": ("500", 500),
    "flush_block_ms": ("50", 50),
    "flush_linger_ms": ("20", 20),
    "flush_claim_idle_ms": ("10000", 10000),
    "report_at": ("3:30", "3:30"),
    "report_dir": ("/var/reports", "/var/reports"),
    "ledger_retention_days": ("30", 30),
    "ledger_partitions_ahead": ("3", 3),
    "webhook_verifier": ("yookassa", "yookassa"),
    "webhook_public_key": ("/etc/keys/pay.pem", "/etc/keys/pay.pem"),
    "yookassa_api_url": ("https://yk.test/v3", "https://yk.test/v3"),
    "yookassa_shop_id": ("shop-1", "shop-1"),
    "yookassa_secret_key": ("live_secret", "live_secret"),
    "yookassa_networks": ("10.0.0.0/8, 192.0.2.1", ("10.0.0.0/8", "192.0.2.1")),
    "trusted_proxies": ("127.0.0.1,::1", ("127.0.0.1", "::1")),
    "provider_timeout_seconds": ("3", 3.0),
}


def test_every_field_is_read_from_its_variable() -> None:
    """Each field (and no other) takes the value of the variable named after it; a new
    field without a sample here fails this test."""
    assert set(SAMPLES) == set(Settings.__struct_fields__)
    for field, (text, expected) in SAMPLES.items():
        settings = load_settings({variable(field): text})
        assert getattr(settings, field) == expected, field
        assert getattr(settings, field) != getattr(Settings(), field), field
    assert variable("callers") == "CALLER_KEYS" and variable("port") == "PORT"


def test_unset_or_empty_variables_keep_the_defaults() -> None:
    """No variable, or an empty one, is the declared default; unknown variables are ignored."""
    assert load_settings({}) == Settings()
    assert load_settings({variable(f): "" for f in SAMPLES} | {"UNRELATED": "x"}) == Settings()


def test_readme_lists_every_variable() -> None:
    """README's configuration table names every variable the settings read."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Configuration (environment)", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    assert {variable(f) for f in Settings.__struct_fields__} <= listed


@pytest.mark.parametrize(("environ", "named"), [
    ({"PORT": "0"}, "PORT '0'"),
    ({"PORT": "65536"}, "PORT '65536'"),
    ({"PORT": "eighty"}, "PORT 'eighty'"),
    ({"WORKERS": "0"}, "WORKERS"),
    ({"METRICS_PORT": "65536"}, "METRICS_PORT"),
    ({"N_SHARDS": "16385"}, "N_SHARDS"),
    ({"IDEMPOTENCY_TTL_SECONDS": "0"}, "IDEMPOTENCY_TTL_SECONDS"),
    ({"REDIS_TIMEOUT_SECONDS": "0"}, "REDIS_TIMEOUT_SECONDS"),
    ({"REDIS_CONNECT_TIMEOUT_SECONDS": "-1"}, "REDIS_CONNECT_TIMEOUT_SECONDS"),
    ({"DB_POOL_MAX": "0"}, "DB_POOL_MAX"),
    ({"REDIS_WAIT_REPLICAS": "-1"}, "REDIS_WAIT_REPLICAS"),
    ({"REDIS_WAIT_TIMEOUT_MS": "1000"}, "REDIS_WAIT_TIMEOUT_MS"),  # half the 2 s timeout
    ({"REDIS_WAIT_DEBITS": "maybe"}, "REDIS_WAIT_DEBITS"),
    ({"DB_POOL_MIN": "-1"}, "DB_POOL_MIN"),
    ({"DB_POOL_MIN": "11"}, "DB_POOL_MIN"),  # more than DB_POOL_MAX's 10
    ({"LOAD_RETRIES": "0"}, "LOAD_RETRIES"),
    ({"MAX_BODY_BYTES": "100"}, "MAX_BODY_BYTES"),
    ({"FLUSH_BLOCK_MS": "0"}, "FLUSH_BLOCK_MS"),
    ({"PROVIDER_TIMEOUT_SECONDS": "0"}, "PROVIDER_TIMEOUT_SECONDS"),
    ({"ENV": "prod"}, "ENV"),
    ({"WEBHOOK_VERIFIER": "trust-me"}, "WEBHOOK_VERIFIER"),
    ({"KEY_PREFIX": "a{b}"}, "KEY_PREFIX"),
    ({"TIMEZONE": "Mars/Olympus"}, "TIMEZONE"),
    ({"TRUSTED_PROXIES": "10.0.0.0/8, nope"}, "TRUSTED_PROXIES"),
    ({"ACTION_METERS": '{"chat_tokens": 1}'}, "ACTION_METERS"),
    ({"ACTION_METERS": "[]"}, "ACTION_METERS"),
    ({"CALLER_KEYS": "{not json"}, "CALLER_KEYS"),
    ({"CALLER_KEYS": '{"a b": {"key": "0123456789abcdef"}}'}, "CALLER_KEYS['a b'].name"),
    ({"CALLER_KEYS": '{"svc": {"key": "short"}}'}, "CALLER_KEYS['svc'].key"),
    ({"CALLER_KEYS": '{"svc": {"key": "0123456789abcdef", "scopes": ["root"]}}'},
     "CALLER_KEYS['svc'].scopes"),
    ({"CALLER_KEYS": '{"svc": {"key": "0123456789abcdef", "scope": ["read"]}}'},
     "CALLER_KEYS['svc']"),
    ({"CALLER_KEYS": '{"svc": "0123456789abcdef"}'}, "CALLER_KEYS['svc']"),
    ({"REPORT_AT": "24:00"}, "REPORT_AT"),
    ({"LEDGER_RETENTION_DAYS": "6"}, "LEDGER_RETENTION_DAYS (6) must cover"),  # TTL 7 days
    ({"LEDGER_RETENTION_DAYS": "1", "IDEMPOTENCY_TTL_SECONDS": "60"},
     "LEDGER_RETENTION_DAYS (1) must cover"),  # the report's two days
    ({"LEDGER_PARTITIONS_AHEAD": "0"}, "LEDGER_PARTITIONS_AHEAD"),
])
def test_invalid_values_are_refused_naming_the_variable(environ: dict[str, str],
                                                        named: str) -> None:
    """Out of its limits or of the wrong kind, a value stops start-up with a message that
    starts from the variable's name, not msgspec's path ($.port)."""
    with pytest.raises(SettingsError) as refused:
        load_settings(environ)
    assert named in str(refused.value)
    assert "$." not in str(refused.value)


def test_a_short_caller_key_is_refused_without_showing_it() -> None:
    """The message about a caller's key names the caller, never the key."""
    with pytest.raises(SettingsError) as refused:
        load_settings({"CALLER_KEYS": '{"svc": {"key": "too-short-key"}}'})
    assert "svc" in str(refused.value) and "too-short-key" not in str(refused.value)


def test_settings_built_in_code_and_overrides_are_checked_by_validate() -> None:
    """Settings(...) takes keyword arguments; with_overrides makes a changed copy; validate
    holds both to the declared limits and rules (the CLI's --port 0 is refused)."""
    settings = Settings(env="test", port=9000, n_shards=16)
    validate(settings)
    moved = settings.with_overrides(port=9001, workers=2)
    assert (moved.port, moved.workers, settings.port) == (9001, 2, 9000)
    for bad, named in (({"port": 0}, "PORT"), ({"workers": 0}, "WORKERS"),
                       ({"n_shards": 20_000}, "N_SHARDS"), ({"report_at": "3pm"}, "REPORT_AT"),
                       ({"db_pool_min": 50}, "DB_POOL_MIN")):
        with pytest.raises(SettingsError, match=named):
            validate(settings.with_overrides(**bad))
    with pytest.raises(TypeError):
        settings.with_overrides(flush_max_attempts=5)  # no such setting


def test_secrets_stay_out_of_repr_and_str() -> None:
    """repr() and str() of Settings and Caller show neither tokens, keys, the webhook key
    nor passwords inside URLs; they do show the rest."""
    secrets = ("service-token-secret-1234", SECRET_KEY, "PEM-PUBLIC-KEY-TEXT",
               "yookassa-secret-5678", "db-password", "redis-password")
    settings = Settings(
        service_token=secrets[0], callers=(Caller("chat-svc", SECRET_KEY, frozenset({"debit"})),),
        webhook_public_key=secrets[2], yookassa_secret_key=secrets[3],
        db_dsn=f"postgresql://billing:{secrets[4]}@db:5432/billing",
        redis_url=f"redis://default:{secrets[5]}@cache:6379/0", port=9002,
    )
    for shown in (repr(settings), str(settings), repr(settings.all_callers()),
                  str(settings.callers[0]), repr(settings.__rich_repr__())):
        for secret in (*secrets, DEV_SERVICE_TOKEN):
            assert secret not in shown
    assert "port=9002" in repr(settings) and "chat-svc" in repr(settings)
    assert "postgresql://billing:***@db:5432/billing" in repr(settings)


@pytest.mark.parametrize(("text", "parsed"), [
    ("", None), ("3:00", (3, 0)), ("03:00", (3, 0)), ("0:05", (0, 5)), ("23:59", (23, 59)),
])
def test_report_at_reads_as_hour_and_minute(text: str, parsed: tuple[int, int] | None) -> None:
    """REPORT_AT takes H:MM and HH:MM; empty means no scheduled report."""
    assert report_time(text) == parsed
    assert load_settings({"REPORT_AT": text}).report_at == text


@pytest.mark.parametrize("text", ["24:00", "3:60", "3:0", "003:00", "3", "3:00pm", " 3:00",
                                  "\uff13:00", "-1:00"])
def test_report_at_refuses_anything_else(text: str) -> None:
    """Anything but H:MM or HH:MM is refused at start-up, naming REPORT_AT."""
    with pytest.raises(SettingsError, match="REPORT_AT"):
        report_time(text)
    with pytest.raises(SettingsError, match="REPORT_AT"):
        load_settings({"REPORT_AT": text})


def test_report_command_defaults_to_yesterday_in_timezone() -> None:
    """`quota-gateway report` without --date totals yesterday in TIMEZONE: at 20:00 UTC on
    2026-11-25 it is 05:00 on the 26th in Tokyo, so the day is the 25th (yesterday in UTC
    is the 24th); at 03:00 UTC on the 26th it is 22:00 on the 25th in New York, so the day
    is the 24th (yesterday in UTC is the 25th)."""
    now = datetime(2026, 11, 25, 20, 0, tzinfo=UTC)
    tokyo = load_settings({"TIMEZONE": "Asia/Tokyo"})
    assert default_report_day(tokyo, now) == date(2026, 11, 25)
    assert default_report_day(load_settings({}), now) == date(2026, 11, 24)
    at_dawn = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)  # 22:00 on the 25th in New York
    new_york = load_settings({"TIMEZONE": "America/New_York"})
    assert default_report_day(new_york, at_dawn) == date(2026, 11, 24)


def test_action_meters_name_actions_and_meters_a_request_can_use() -> None:
    """An action no debit could name (capitals, a dash) or a meter no plan could hold is
    refused at start-up, naming ACTION_METERS."""
    for raw in ('{"Chat-Tokens": "chat"}', '{"chat_tokens": "Chat"}', '{"": "chat"}'):
        with pytest.raises(SettingsError, match="ACTION_METERS"):
            load_settings({"ACTION_METERS": raw})

