-- 0010: allowances that follow the purchase (the `cycle` period).
--
-- A meter whose period is `cycle` grants its allowance once per plan assignment: from the
-- assignment's start for the plan's duration, afresh on a renewal or a plan change. The
-- counter is keyed by the assignment's version (user_plans.version: every assignment is a
-- new one) and the ledger records the period as `y:<version>`; the assignment's start
-- (user_plans.started_at, now set by the service's clock) decides the rule below.
--
-- cycle_since: when the meter became `cycle` in its plan. An assignment that began before
-- it keeps counting that meter by calendar month until it ends (its next purchase or plan
-- apply starts a cycle), so the switch grants no one a second allowance within what they
-- already paid for.
ALTER TABLE plan_meters DROP CONSTRAINT plan_meters_period_check;
ALTER TABLE plan_meters ADD CONSTRAINT plan_meters_period_check
    CHECK (period IN ('day', 'month', 'none', 'cycle'));
ALTER TABLE plan_meters ADD COLUMN cycle_since timestamptz;
ALTER TABLE plan_meters ADD CONSTRAINT plan_meters_cycle_since
    CHECK ((period = 'cycle') = (cycle_since IS NOT NULL));

-- The shipped 30-day plans: their monthly allowances follow the purchase from now on.
UPDATE plan_meters SET period = 'cycle', cycle_since = now()
WHERE plan_code IN ('pro_month', 'base750') AND period = 'month';
UPDATE plans SET version = nextval('catalog_version_seq'), updated_at = now()
WHERE plan_code IN ('pro_month', 'base750')
  AND EXISTS (SELECT 1 FROM plan_meters m WHERE m.plan_code = plans.plan_code
              AND m.period = 'cycle');
