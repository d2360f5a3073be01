"""What every command needs first: the settings, or a clear message naming what is wrong."""

from __future__ import annotations

import click

from core.settings import Settings, SettingsError, load_settings, validate


def settings_or_exit(**overrides: object) -> Settings:
    """The settings from the environment with ``overrides`` (CLI flags) applied and
    validated as the variables would be; a ClickException naming what is wrong."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return settings
    settings = settings.with_overrides(**changes)
    try:
        validate(settings)  # --port 0, --workers 0: refused as the variables would be
    except SettingsError as exc:
        raise click.ClickException(f"configuration: {exc}") from None
    return settings


def with_servers(command: str) -> Settings:
    """The settings of a command that needs REDIS_URL and DB_DSN set."""
    settings = settings_or_exit()
    if not settings.redis_url or not settings.db_dsn:
        raise click.ClickException(f"{command} needs REDIS_URL and DB_DSN")
    return settings
