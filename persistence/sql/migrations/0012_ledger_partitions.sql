-- 0012: the ledger at volume: partitioned by month, raw debits pruned, daily rollups kept.
--
-- At 5,000 debits/s the ledger gains 430 million rows a day. It becomes a partitioned table:
--   ledger                     PARTITION BY LIST (kind)
--     ledger_money             credit, refund, plan: money and plan records, kept for good
--     ledger_flow  (DEFAULT)   every other kind (debit, hold, commit, ...), PARTITION BY
--                              RANGE (occurred_at):
--       ledger_flow_YYYY_MM    one a month (UTC months), created ahead by `migrate` and by
--                              the reconciler (ledger_ensure_partitions)
--       ledger_flow_default    the safety net: rows of a month whose partition does not exist
--                              yet (moved out when it is created)
-- A flow partition older than LEDGER_RETENTION_DAYS is detached, rolled up into
-- ledger_daily (per day in TIMEZONE, user, meter, kind, plan and period) and dropped
-- (ledger_detach_oldest, ledger_rollup_detached): no row is ever both raw and rolled up,
-- so readers add the two.
--
-- Uniqueness. A unique index of a partitioned table must contain the partition keys, so:
-- * tx_id: the primary key is (tx_id, kind, occurred_at). A stream entry redelivered after a
--   crash carries the same tx_id, kind and time (they are in the entry), so it still inserts
--   nothing. Rule for every writer: one tx_id, one occurred_at (an event written by more
--   than one script must carry a time fixed in advance, e.g. a hold's expiry at its
--   expires_at).
-- * a debit's (user_id, ref, ref_round): a retry debited again after Redis lost the first
--   debit has another tx_id and another time, so the time cannot be in this key. It moves
--   to a table of its own, ledger_debit_keys, unpartitioned, written in the same statement
--   as the ledger rows (flush_events: a debit is inserted only if its key is), and pruned
--   with the partition its debits were in.
--
-- An existing ledger is moved in place (renamed, copied, dropped): the migration holds an
-- ACCESS EXCLUSIVE lock on it for the copy (measured in docs/benchmarks.md).

ALTER TABLE ledger RENAME TO ledger_unpartitioned;
ALTER TABLE ledger_unpartitioned RENAME CONSTRAINT ledger_pkey TO ledger_unpartitioned_pkey;
ALTER INDEX ledger_user_time RENAME TO ledger_unpartitioned_user_time;
ALTER INDEX ledger_user_ref RENAME TO ledger_unpartitioned_user_ref;
ALTER INDEX ledger_occurred RENAME TO ledger_unpartitioned_occurred;
ALTER INDEX ledger_debit_ref_round RENAME TO ledger_unpartitioned_debit_ref_round;

-- Same columns, defaults, NOT NULLs and CHECK constraints (with their names) as before.
CREATE TABLE ledger (LIKE ledger_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY LIST (kind);
ALTER TABLE ledger ADD PRIMARY KEY (tx_id, kind, occurred_at);
CREATE TABLE ledger_money PARTITION OF ledger FOR VALUES IN ('credit', 'refund', 'plan');
CREATE TABLE ledger_flow PARTITION OF ledger DEFAULT PARTITION BY RANGE (occurred_at);
CREATE TABLE ledger_flow_default PARTITION OF ledger_flow DEFAULT;

-- One debit per (user_id, ref, ref_round) in the ledger, whatever Redis did (0005, 0007).
CREATE TABLE ledger_debit_keys (
    user_id     text NOT NULL,
    ref         text NOT NULL,
    ref_round   integer NOT NULL,
    tx_id       uuid NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, ref, ref_round)
);

-- Daily rollups of pruned flow rows, kept for good. `day` is the day in TIMEZONE.
CREATE TABLE ledger_daily (
    day                  date NOT NULL,
    user_id              text NOT NULL,
    meter                text NOT NULL,
    kind                 text NOT NULL,
    plan_code            text NOT NULL DEFAULT '',
    period_id            text NOT NULL DEFAULT '',
    events               bigint NOT NULL CHECK (events > 0),
    amount_micro         bigint NOT NULL,
    from_allowance_micro bigint NOT NULL,
    from_credits_micro   bigint NOT NULL,
    PRIMARY KEY (user_id, day, meter, kind, plan_code, period_id)
);
CREATE INDEX ledger_daily_day ON ledger_daily (day);

-- Creates the monthly flow partitions from the month of $1 to the month of $2 (UTC) that do
-- not exist yet, moving into each the rows the default partition holds of its month.
-- Returns how many it created. Serialized by an advisory lock (reconcilers run it too).
CREATE FUNCTION ledger_ensure_partitions(first_at timestamptz, last_at timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    month timestamp := date_trunc('month', first_at AT TIME ZONE 'UTC');
    lo timestamptz;
    hi timestamptz;
    name text;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7311004);
    WHILE month <= date_trunc('month', last_at AT TIME ZONE 'UTC') LOOP
        name := 'ledger_flow_' || to_char(month, 'YYYY_MM');
        lo := month AT TIME ZONE 'UTC';
        hi := (month + interval '1 month') AT TIME ZONE 'UTC';
        IF to_regclass(name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE ledger INCLUDING DEFAULTS '
                           'INCLUDING CONSTRAINTS)', name);
            EXECUTE format('WITH moved AS (DELETE FROM ledger_flow_default '
                           'WHERE occurred_at >= $1 AND occurred_at < $2 RETURNING *) '
                           'INSERT INTO %I SELECT * FROM moved', name) USING lo, hi;
            EXECUTE format('ALTER TABLE ledger_flow ATTACH PARTITION %I '
                           'FOR VALUES FROM (%L) TO (%L)', name, lo, hi);
            created := created + 1;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END $$;

-- Pruning is two steps, each one transaction, so that the long one locks nothing the
-- flush needs:
-- 1. ledger_detach_oldest: detaches the oldest monthly flow partition that ends at or
--    before the cutoff (a brief ACCESS EXCLUSIVE lock on ledger_flow, as any DETACH takes).
--    From then on a late event of that month lands in the default partition, raw.
-- 2. ledger_rollup_detached: adds a detached partition's rows into ledger_daily, deletes its
--    debits' keys and drops it. A detached table left by a crash between the steps is
--    found by its name and finished first. No row is ever both raw and rolled up.
CREATE FUNCTION ledger_detach_oldest(cutoff timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    PERFORM pg_advisory_xact_lock(7311004);
    SELECT c.relname INTO name
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'ledger_flow'::regclass AND c.relname ~ '^ledger_flow_\d{4}_\d{2}$'
      AND (to_date(substr(c.relname, 13), 'YYYY_MM') + interval '1 month')::timestamp
          AT TIME ZONE 'UTC' <= cutoff
    ORDER BY c.relname LIMIT 1;
    IF name IS NOT NULL THEN
        EXECUTE format('ALTER TABLE ledger_flow DETACH PARTITION %I', name);
    END IF;
    RETURN name;
END $$;

CREATE FUNCTION ledger_rollup_detached(zone text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    name text;
BEGIN
    PERFORM pg_advisory_xact_lock(7311005);  -- one rollup at a time; not ensure's lock
    SELECT c.relname INTO name
    FROM pg_class c
    WHERE c.relname ~ '^ledger_flow_\d{4}_\d{2}$' AND c.relkind = 'r' AND NOT c.relispartition
      AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'ledger_flow'::regclass)
    ORDER BY c.relname LIMIT 1;
    IF name IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format(
        'INSERT INTO ledger_daily AS d (day, user_id, meter, kind, plan_code, period_id, '
        '    events, amount_micro, from_allowance_micro, from_credits_micro) '
        'SELECT (occurred_at AT TIME ZONE $1)::date, user_id, meter, kind, '
        '       coalesce(plan_code, ''''), period_id, count(*), sum(amount_micro), '
        '       sum(from_allowance_micro), sum(from_credits_micro) '
        'FROM %I GROUP BY 1, 2, 3, 4, 5, 6 '
        'ON CONFLICT (user_id, day, meter, kind, plan_code, period_id) DO UPDATE '
        'SET events = d.events + EXCLUDED.events, '
        '    amount_micro = d.amount_micro + EXCLUDED.amount_micro, '
        '    from_allowance_micro = d.from_allowance_micro + EXCLUDED.from_allowance_micro, '
        '    from_credits_micro = d.from_credits_micro + EXCLUDED.from_credits_micro',
        name) USING zone;
    EXECUTE format(
        'DELETE FROM ledger_debit_keys k USING %I l WHERE l.kind = ''debit'' '
        'AND k.user_id = l.user_id AND k.ref = l.ref AND k.ref_round = l.ref_round '
        'AND k.tx_id = l.tx_id', name);
    EXECUTE format('DROP TABLE %I', name);
    RETURN name;
END $$;

-- Move the existing rows: partitions for every month the flow rows cover, and this one.
SELECT ledger_ensure_partitions(least(min(occurred_at), now()), now())
FROM ledger_unpartitioned WHERE kind NOT IN ('credit', 'refund', 'plan');
INSERT INTO ledger SELECT * FROM ledger_unpartitioned;
INSERT INTO ledger_debit_keys (user_id, ref, ref_round, tx_id, occurred_at)
SELECT user_id, ref, ref_round, tx_id, occurred_at FROM ledger_unpartitioned
WHERE kind = 'debit' AND ref IS NOT NULL;
DROP TABLE ledger_unpartitioned;

-- The indexes the readers use, built once over the moved rows.
CREATE INDEX ledger_user_time ON ledger (user_id, occurred_at DESC, tx_id DESC);
CREATE INDEX ledger_user_ref ON ledger (user_id, ref) WHERE ref IS NOT NULL AND kind <> 'debit';
CREATE INDEX ledger_occurred ON ledger (occurred_at);
