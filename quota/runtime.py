"""What every part of the engine shares: the settings, the clients, the clock, the keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.clock import Clock
from core.settings import Settings
from lua.cluster import HotRedis
from lua.keys import Keys
from lua.periods import Calendar, Windows
from lua.scripts import Scripts
from persistence.db import Database


@dataclass(frozen=True, slots=True)
class Runtime:
    """One process's dependencies, handed to each part of the engine."""

    settings: Settings
    redis: HotRedis
    db: Database
    clock: Clock
    new_id: Callable[[int | None], str]
    keys: Keys
    scripts: Scripts
    calendar: Calendar

    def windows(self) -> Windows:
        """The day and month windows that contain this process's now."""
        return self.calendar.windows(self.clock.now_ms())

    @property
    def state_ttl_ms(self) -> int:
        """How long a user's state lives in Redis after its last change, ms."""
        return self.settings.user_state_ttl_seconds * 1000
