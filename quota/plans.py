"""Plans: assigning a plan to a user, and changing the catalog, PostgreSQL first."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from core.clock import from_ms
from core.errors import DependencyUnavailable, NotFound
from persistence.plans import Plan, put_plan
from persistence.queries import QUERIES
from quota.loading import Loader
from quota.outbox import Outbox
from quota.runtime import Runtime

log = logging.getLogger("quota_gateway.plans")


@dataclass(frozen=True, slots=True)
class PlanAssignment:
    """The result of applying a plan to a user."""

    user_id: str
    plan_code: str
    expires_ms: int
    version: int
    tx_id: str
    applied_in_redis: bool


class Plans:
    """Plan assignments (written through the outbox) and catalog changes."""

    def __init__(self, rt: Runtime, loader: Loader, outbox: Outbox) -> None:
        self.rt = rt
        self.loader = loader
        self.outbox = outbox

    async def apply(
        self, user_id: str, plan_code: str, expires_ms: int | None, caller: str
    ) -> PlanAssignment:
        """Assign a plan: committed in PostgreSQL (with its ledger event), then in Redis."""
        rt = self.rt
        now_ms = rt.clock.now_ms()
        tx_id = rt.new_id(now_ms)
        async with rt.db.transaction() as conn:
            plan = await conn.fetchrow(QUERIES["get_plan_row"], plan_code)
            if plan is None:
                raise NotFound(f"unknown plan {plan_code!r}", field="plan_code")
            if expires_ms is None and plan["duration_days"]:
                expires_ms = now_ms + plan["duration_days"] * 86_400_000
            expires_at = from_ms(expires_ms) if expires_ms else None
            row = await conn.fetchrow(QUERIES["set_user_plan"], user_id, plan_code, expires_at,
                                      from_ms(now_ms))
            assert row is not None
            await conn.execute(QUERIES["insert_plan_event"], tx_id, user_id, plan_code, caller,
                               None, from_ms(now_ms))
            payload = {"plan_code": plan_code, "expires_ms": expires_ms or 0,
                       "version": row["version"], "start_ms": now_ms}
            outbox_id = await conn.fetchval(QUERIES["insert_outbox"], user_id, "plan", payload)
        applied = await self.outbox.apply(outbox_id, user_id, "plan", payload, quiet=True)
        return PlanAssignment(user_id, plan_code, expires_ms or 0, row["version"], tx_id, applied)

    async def put_and_sync(self, plan: Plan, caller: str, *,
                           from_version: int | None = None) -> Plan:
        """Write a plan to PostgreSQL as ``caller`` (see ``put_plan``), then push the new
        catalog to every shard.

        Redis is asked first: when it is down the PUT answers 503 and nothing is committed.
        Once the plan is committed the PUT succeeds, even if the copy to the shards is cut
        short (Redis went away in between): the change is durable, and
        ``Loader.resync_catalog`` (the reconciler's chores) finishes the copy; a 503 then
        would have the caller's retry of its ``version`` refused as a conflict with its
        own change."""
        await self.rt.redis.execute("PING")
        stored = await put_plan(self.rt.db, plan, caller, from_version=from_version,
                                now_ms=self.rt.clock.now_ms())
        try:
            await self.loader.sync_catalog()
        except DependencyUnavailable as exc:
            log.warning("plan %s version %d committed, but copying the catalog to Redis "
                        "failed (%s): the reconciler's catalog resync finishes it",
                        stored.plan_code, stored.version, exc)
        return stored
