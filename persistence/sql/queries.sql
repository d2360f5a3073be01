-- Every SQL statement of the service, each under a `-- name: <name> --` header followed by
-- a description that names its parameters ($1..$n). Parsed once at import by queries.py.

-- name: catalog_version --
-- The catalog's version: the highest version of any plan (0 when there is none).
SELECT coalesce(max(version), 0) AS version FROM plans;

-- name: list_plans --
-- Every plan with its meters as JSON rows, ordered by code.
SELECT p.plan_code, p.duration_days, p.price::text AS price, p.currency, p.version,
       p.updated_by,
       coalesce(
           jsonb_agg(jsonb_build_object('meter', m.meter, 'period', m.period,
                                        'limit_micro', m.limit_micro::text,
                                        'overdraft_micro', m.overdraft_micro::text,
                                        'since_ms', (extract(epoch FROM m.cycle_since)
                                                     * 1000)::bigint::text)
                     ORDER BY m.meter) FILTER (WHERE m.meter IS NOT NULL),
           '[]'::jsonb) AS meters
FROM plans p
LEFT JOIN plan_meters m ON m.plan_code = p.plan_code
GROUP BY p.plan_code
ORDER BY p.plan_code;

-- name: get_plan_row --
-- One plan's header row; $1 plan_code.
SELECT plan_code, duration_days, price::text AS price, currency, version, updated_by
FROM plans WHERE plan_code = $1;

-- name: upsert_plan --
-- Create or replace a plan header and give it a new catalog version;
-- $1 plan_code, $2 duration_days (NULL = no expiry), $3 price (text), $4 currency,
-- $5 updated_by (the caller's name).
INSERT INTO plans (plan_code, duration_days, price, currency, updated_by)
VALUES ($1, $2, $3::numeric, $4, $5)
ON CONFLICT (plan_code) DO UPDATE
SET duration_days = EXCLUDED.duration_days, price = EXCLUDED.price,
    currency = EXCLUDED.currency, version = nextval('catalog_version_seq'), updated_at = now(),
    updated_by = EXCLUDED.updated_by
RETURNING version;

-- name: delete_plan_meters --
-- Remove a plan's meters before writing its new set; $1 plan_code.
DELETE FROM plan_meters WHERE plan_code = $1;

-- name: insert_plan_meters --
-- Write a plan's meters; $1 plan_code, $2 meters[], $3 periods[], $4 limits (micro)[],
-- $5 when each became `cycle` (epoch ms, NULL for other periods)[], $6 overdrafts (micro)[].
INSERT INTO plan_meters (plan_code, meter, period, limit_micro, cycle_since, overdraft_micro)
SELECT $1, m, p, l, to_timestamp(s / 1000.0), o
FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
     AS t (m, p, l, s, o);

-- name: plan_cycle_since --
-- When each `cycle` meter of a plan became one (epoch ms); $1 plan_code.
SELECT meter, (extract(epoch FROM cycle_since) * 1000)::bigint AS since_ms
FROM plan_meters WHERE plan_code = $1 AND period = 'cycle';

-- name: lock_catalog --
-- Serialize catalog writers so versions are committed in order (transaction-scoped).
SELECT pg_advisory_xact_lock(7311001);

-- name: get_user_plan --
-- A user's assigned plan, or no row for a user on the default plan; $1 user_id.
SELECT plan_code, started_at, expires_at, version FROM user_plans WHERE user_id = $1;

-- name: set_user_plan --
-- Assign a plan; $1 user_id, $2 plan_code, $3 expires_at (NULL = never), $4 started_at (the
-- service's clock: a `cycle` allowance counts from it). Returns the version.
INSERT INTO user_plans (user_id, plan_code, expires_at, started_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id) DO UPDATE
SET plan_code = EXCLUDED.plan_code, expires_at = EXCLUDED.expires_at,
    started_at = EXCLUDED.started_at, version = nextval('user_plan_version_seq'),
    updated_at = now()
RETURNING version, started_at, expires_at;

-- name: insert_plan_event --
-- Record a plan assignment in the ledger; $1 tx_id, $2 user_id, $3 plan_code, $4 caller,
-- $5 reason (e.g. the expiry), $6 occurred_at.
INSERT INTO ledger (tx_id, kind, user_id, plan_code, caller, reason, occurred_at)
VALUES ($1, 'plan', $2, $3, $4, $5, $6);

-- name: user_credits --
-- A user's credit balances; $1 user_id.
SELECT meter, balance_micro FROM credit_balances WHERE user_id = $1;

-- name: user_usage --
-- A user's flushed usage in the given periods; $1 user_id, $2 period ids[].
SELECT meter, period_id, used_micro FROM usage_counters
WHERE user_id = $1 AND period_id = ANY($2::text[]);

-- name: user_load_state --
-- Everything loading users into Redis reads, in one statement (so one snapshot per user:
-- the credit balances and the payment changes they already hold agree) and one round
-- trip for all the users loaded at once (quota/loading.py gathers them): per user, one row
-- with the plan (code, version, start and expiry in epoch ms), credit balances, payment
-- changes not applied in Redis whose effect the balances hold (credits, and refunds whose
-- ledger events were flushed), flushed usage of the periods $2 and of the plan's cycle
-- (y:<plan version>), the first page of debits whose idempotency keys may still live (as
-- user_recent_debits), and the user's holds: the open ones and those reserved or closed
-- since $3 (their refs and results are restored).
-- $1 user_id[], $2 period ids[], $3 the start of the ref window, $4 the page size.
SELECT u.user_id, s.* FROM unnest($1::text[]) AS u (user_id)
CROSS JOIN LATERAL (
    WITH plan AS (
        SELECT plan_code, version,
               floor(extract(epoch FROM started_at) * 1000)::bigint AS start_ms,
               floor(extract(epoch FROM expires_at) * 1000)::bigint AS expires_ms
        FROM user_plans WHERE user_id = u.user_id
    )
    SELECT
        (SELECT to_jsonb(plan) FROM plan) AS plan,
        (SELECT coalesce(jsonb_agg(jsonb_build_array(meter, balance_micro)), '[]')
         FROM credit_balances WHERE user_id = u.user_id) AS credits,
        (SELECT coalesce(jsonb_agg(o.id ORDER BY o.id), '[]') FROM redis_outbox o
         WHERE o.user_id = u.user_id AND o.applied_at IS NULL
           AND (o.op = 'credit'
                OR (o.op = 'refund' AND EXISTS (
                    SELECT 1 FROM ledger l
                    WHERE l.user_id = u.user_id AND l.kind = 'refund'
                      AND l.ref = o.payload ->> 'refund_id')))) AS included,
        (SELECT coalesce(jsonb_agg(jsonb_build_array(meter, period_id, used_micro)), '[]')
         FROM usage_counters
         WHERE user_id = u.user_id AND (period_id = ANY($2::text[])
                                 OR period_id = 'y:' || (SELECT version FROM plan))) AS usage,
        (SELECT coalesce(jsonb_agg(jsonb_build_array(
                    ref, tx_id, meter, amount_micro, reason, remaining_micro,
                    floor(extract(epoch FROM occurred_at) * 1000)::bigint, occurred_at)
                 ORDER BY occurred_at, tx_id), '[]')
         FROM (SELECT ref, tx_id, meter, amount_micro, reason, remaining_micro, occurred_at
               FROM ledger
               WHERE user_id = u.user_id AND kind = 'debit' AND ref IS NOT NULL
                 AND (occurred_at, tx_id) > ($3::timestamptz, '00000000-0000-0000-0000-000000000000'::uuid)
               ORDER BY occurred_at, tx_id LIMIT $4) AS page) AS refs,
        (SELECT coalesce(jsonb_agg(jsonb_build_array(
                    hold_id, meter, units_micro, ref, coalesce(reason, ''), caller,
                    coalesce(action, ''), remaining_micro, expiry_tx, state,
                    floor(extract(epoch FROM created_at) * 1000)::bigint,
                    floor(extract(epoch FROM expires_at) * 1000)::bigint,
                    floor(extract(epoch FROM closed_at) * 1000)::bigint,
                    settled_micro, from_allowance_micro, from_credits_micro,
                    settle_remaining_micro, settle_tx) ORDER BY created_at, hold_id), '[]')
         FROM holds
         WHERE user_id = u.user_id AND (state = 'open' OR created_at > $3::timestamptz
                                 OR closed_at > $3::timestamptz)) AS holds
) AS s;

-- name: user_recent_debits --
-- One page, oldest first, of a user's debits whose idempotency keys may still live: what
-- load_user restores when Redis lost them. $1 user_id; $2, $3 the (occurred_at, tx_id)
-- after which the page starts (the previous page's last row; at first the start of the TTL
-- window and the nil UUID); $4 the page size. Walks the ledger_user_time index.
SELECT ref, tx_id, meter, amount_micro, reason, remaining_micro, occurred_at FROM ledger
WHERE user_id = $1 AND (occurred_at, tx_id) > ($2::timestamptz, $3::uuid)
  AND kind = 'debit' AND ref IS NOT NULL
ORDER BY occurred_at, tx_id LIMIT $4;

-- name: user_transactions --
-- A user's ledger, newest first: raw rows, and the daily rollups of pruned ones (one row per
-- day, meter, kind, plan and period: `events` rows added up, at the day's start in the zone
-- $5, `rolled_up`, and as tx_id the md5 of its key, a name for the page cursor). $1 user_id,
-- $2 before (occurred_at, exclusive; NULL = now), $3 before tx_id (tie-breaker, NULL =
-- none), $4 limit, $5 TIMEZONE.
SELECT * FROM (
    (SELECT tx_id, kind, meter, amount_micro, from_allowance_micro, from_credits_micro,
            period_id, ref, reason, caller, action, plan_code, occurred_at,
            1::bigint AS events, false AS rolled_up
     FROM ledger
     WHERE user_id = $1
       AND ($2::timestamptz IS NULL OR (occurred_at, tx_id) < ($2, coalesce($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid)))
     ORDER BY occurred_at DESC, tx_id DESC
     LIMIT $4)
    UNION ALL
    (SELECT * FROM (
        SELECT md5(concat_ws('|', day, meter, kind, plan_code, period_id))::uuid AS tx_id,
               kind, meter, amount_micro, from_allowance_micro, from_credits_micro,
               period_id, NULL::text AS ref, NULL::text AS reason, '' AS caller,
               NULL::text AS action, nullif(plan_code, '') AS plan_code,
               (day::timestamp AT TIME ZONE $5::text) AS occurred_at, events,
               true AS rolled_up
        FROM ledger_daily
        WHERE user_id = $1
          AND ($2::timestamptz IS NULL OR day <= ($2 AT TIME ZONE $5::text)::date)) AS d
     WHERE $2::timestamptz IS NULL OR (occurred_at, tx_id) < ($2, coalesce($3, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
     ORDER BY occurred_at DESC, tx_id DESC
     LIMIT $4)
) AS rows
ORDER BY occurred_at DESC, tx_id DESC
LIMIT $4;

-- name: ping --
-- Readiness: proves a pooled connection can run a query against our schema.
SELECT count(*) AS plans FROM plans;

-- name: insert_outbox --
-- Queue a write-through change for Redis; $1 user_id, $2 op, $3 payload (jsonb). Returns id.
INSERT INTO redis_outbox (user_id, op, payload) VALUES ($1, $2, $3) RETURNING id;

-- name: mark_outbox_applied --
-- A queued change reached Redis; $1 id.
UPDATE redis_outbox SET applied_at = now() WHERE id = $1 AND applied_at IS NULL;

-- name: pending_outbox --
-- Queued changes not applied yet and older than $1 (interval), oldest first; $2 limit.
SELECT id, user_id, op, payload FROM redis_outbox
WHERE applied_at IS NULL AND created_at < now() - $1::interval
ORDER BY id LIMIT $2;

-- name: flush_events --
-- Write a batch of ledger events in one statement, idempotent on tx_id (the ledger's key,
-- with the kind and time an event always carries) and on a debit's (user_id, ref,
-- ref_round) (ledger_debit_keys: a debit is inserted only if its key is), and advance usage
-- and credit counters by the rows really inserted (a redelivered event, or a second debit
-- of one ref after Redis lost data, inserts nothing). Debits, settles of holds ('commit')
-- and refunds all take their from_credits part off the credit balance. Counter rows are upserted in key order so
-- concurrent reconcilers cannot deadlock.
-- $1 tx_id[], $2 kind[], $3 user_id[], $4 meter[], $5 amount_micro[],
-- $6 from_allowance_micro[], $7 from_credits_micro[], $8 period_id[], $9 ref[], $10 reason[],
-- $11 caller[], $12 action[], $13 plan_code[], $14 shard[], $15 stream_id[], $16 occurred_at[],
-- $17 remaining_micro[], $18 ref_round[].
WITH batch AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                         $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $12::text[], $13::text[], $14::int[], $15::text[],
                         $16::timestamptz[], $17::bigint[], $18::int[])
        AS b (tx_id, kind, user_id, meter, amount_micro, from_allowance_micro,
              from_credits_micro, period_id, ref, reason, caller, action, plan_code,
              shard, stream_id, occurred_at, remaining_micro, ref_round)
), debit_keys AS (
    INSERT INTO ledger_debit_keys (user_id, ref, ref_round, tx_id, occurred_at)
    SELECT user_id, ref, ref_round, tx_id, occurred_at FROM batch
    WHERE kind = 'debit' AND ref IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING tx_id
), inserted AS (
    INSERT INTO ledger (tx_id, kind, user_id, meter, amount_micro, from_allowance_micro,
                        from_credits_micro, period_id, ref, reason, caller, action, plan_code,
                        shard, stream_id, occurred_at, remaining_micro, ref_round)
    SELECT * FROM batch
    WHERE kind <> 'debit' OR ref IS NULL OR tx_id IN (SELECT tx_id FROM debit_keys)
    ON CONFLICT DO NOTHING
    RETURNING kind, user_id, meter, period_id, from_allowance_micro, from_credits_micro
), usage AS (
    INSERT INTO usage_counters AS u (user_id, meter, period_id, used_micro)
    SELECT user_id, meter, period_id, sum(from_allowance_micro)
    FROM inserted WHERE kind IN ('debit', 'commit') AND from_allowance_micro > 0
    GROUP BY user_id, meter, period_id
    ORDER BY user_id, meter, period_id
    ON CONFLICT (user_id, meter, period_id)
    DO UPDATE SET used_micro = u.used_micro + EXCLUDED.used_micro, updated_at = now()
), spent AS (
    INSERT INTO credit_balances AS c (user_id, meter, balance_micro)
    SELECT user_id, meter, -sum(from_credits_micro)
    FROM inserted WHERE kind IN ('debit', 'refund', 'commit') AND from_credits_micro > 0
    GROUP BY user_id, meter
    ORDER BY user_id, meter
    ON CONFLICT (user_id, meter)
    DO UPDATE SET balance_micro = c.balance_micro + EXCLUDED.balance_micro, updated_at = now()
)
SELECT count(*) AS inserted FROM inserted;

-- name: debit_ref_rounds --
-- The debits of (user_id $1, ref $2) in the ledger (their keys, kept as long as the raw
-- debits): the last round (NULL: none), and whether one of them lies within the
-- idempotency TTL $4 (interval) of the time $3 of a debit the ledger refused (then Redis
-- should have answered that one as a duplicate).
SELECT max(ref_round) AS last_round,
       coalesce(bool_or(occurred_at >= $3::timestamptz - $4::interval
                        AND occurred_at <= $3::timestamptz + $4::interval), false) AS near
FROM ledger_debit_keys WHERE user_id = $1 AND ref = $2;

-- name: ledger_missing_tx --
-- Which of the tx ids $1 the ledger does not hold (after a flush: the debits refused as a
-- second debit of their (user_id, ref)).
SELECT t.tx_id FROM unnest($1::uuid[]) AS t(tx_id)
WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.tx_id = t.tx_id);

-- name: insert_poison --
-- Keep a stream entry that cannot be written; $1 shard, $2 stream_id, $3 fields (jsonb),
-- $4 error. A second attempt for the same entry keeps the first row.
INSERT INTO poison_events (shard, stream_id, fields, error) VALUES ($1, $2, $3, $4)
ON CONFLICT (shard, stream_id) DO NOTHING;

-- name: list_poison --
-- Poisoned ledger entries, newest first; $1 true to include the replayed ones, $2 limit.
SELECT id, shard, stream_id, fields, error, created_at, replayed_at, replay_result
FROM poison_events WHERE $1 OR replayed_at IS NULL ORDER BY id DESC LIMIT $2;

-- name: get_poison --
-- One poisoned ledger entry; $1 id.
SELECT * FROM poison_events WHERE id = $1;

-- name: mark_poison_replayed --
-- A poisoned entry that a replay wrote (or found written); $1 id, $2 result. The first
-- replay's result stays.
UPDATE poison_events SET replayed_at = now(), replay_result = $2
WHERE id = $1 AND replayed_at IS NULL;

-- name: poison_count --
-- How many entries were set aside.
SELECT count(*) FROM poison_events;

-- name: day_totals --
-- Debits per plan and meter in [$1, $2) (the report day in TIMEZONE, as UTC instants): the
-- raw rows, plus the daily rollups of day $3 (the rows pruned; never the same rows).
SELECT plan_code, meter, sum(debits)::bigint AS debits,
       sum(amount_micro)::bigint AS amount_micro,
       sum(allowance_micro)::bigint AS allowance_micro,
       sum(credits_micro)::bigint AS credits_micro
FROM (
    SELECT coalesce(plan_code, '') AS plan_code, meter, count(*) AS debits,
           -sum(amount_micro) AS amount_micro, sum(from_allowance_micro) AS allowance_micro,
           sum(from_credits_micro) AS credits_micro
    FROM ledger
    WHERE kind = 'debit' AND occurred_at >= $1 AND occurred_at < $2
    GROUP BY 1, 2
    UNION ALL
    SELECT plan_code, meter, sum(events), -sum(amount_micro), sum(from_allowance_micro),
           sum(from_credits_micro)
    FROM ledger_daily
    WHERE kind = 'debit' AND day = $3::date
    GROUP BY 1, 2
) AS t
GROUP BY 1, 2 ORDER BY 1, 2;

-- name: day_hourly --
-- Debited amount per meter and hour of [$1, $2), hours counted from $1 (raw rows only: a
-- day whose rows were pruned has its totals in the rollups, not its hours).
SELECT meter, floor(extract(epoch FROM occurred_at - $1) / 3600)::int AS hour,
       (-sum(amount_micro))::bigint AS amount_micro
FROM ledger
WHERE kind = 'debit' AND occurred_at >= $1 AND occurred_at < $2
GROUP BY 1, 2 ORDER BY 1, 2;

-- name: usage_in_periods --
-- Flushed usage of every user in the given periods; $1 period ids[].
SELECT user_id, meter, period_id, used_micro FROM usage_counters
WHERE period_id = ANY($1::text[]);

-- name: insert_report --
-- Store a report's summary; $1 report_date, $2 drift_count, $3 summary (jsonb).
INSERT INTO reconciliation_reports (report_date, drift_count, summary) VALUES ($1, $2, $3)
RETURNING id;

-- name: try_report_lock --
-- One scheduled report at a time across reconcilers (session-level advisory lock).
SELECT pg_try_advisory_lock(7311002) AS locked;

-- name: report_unlock --
-- Release the report lock.
SELECT pg_advisory_unlock(7311002);

-- name: report_exists --
-- Whether a report for day $1 was already stored.
SELECT exists(SELECT 1 FROM reconciliation_reports WHERE report_date = $1);

-- name: pending_outbox_count --
-- How many write-through changes wait for Redis (a metric).
SELECT count(*) FROM redis_outbox WHERE applied_at IS NULL;

-- name: get_receipt --
-- One receipt by order id; $1 order_id.
SELECT * FROM payment_receipts WHERE order_id = $1;

-- name: get_receipt_by_payment --
-- One receipt by the provider's payment id; $1 payment_id.
SELECT * FROM payment_receipts WHERE payment_id = $1;

-- name: lock_order --
-- Serialize concurrent requests for one order (transaction-scoped); $1 order_id.
SELECT pg_advisory_xact_lock(hashtextextended('order:' || $1, 7311003));

-- name: insert_receipt --
-- Record a payment; $1 order_id, $2 payment_id, $3 user_id, $4 plan_code, $5 status,
-- $6 amount (text), $7 currency, $8 credits (jsonb), $9 fingerprint, $10 source, $11 caller,
-- $12 plan_expires_at, $13 plan_version, $14 tx_id, $15 outbox_id, $16 result (jsonb),
-- $17 created_at (the service clock, as for ledger events).
INSERT INTO payment_receipts (order_id, payment_id, user_id, plan_code, status, amount, currency,
                              credits, fingerprint, source, caller, plan_expires_at,
                              plan_version, tx_id, outbox_id, result, created_at)
VALUES ($1, $2, $3, $4, $5, $6::numeric, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17);

-- name: attach_payment --
-- Remember which payment paid an order credited through the API; $1 order_id, $2 payment_id.
UPDATE payment_receipts SET payment_id = $2 WHERE order_id = $1 AND payment_id IS NULL;

-- name: add_credit_balance --
-- Add a credit to a user's balance of one meter; $1 user_id, $2 meter, $3 micro-units.
-- Returns the new balance (the caller refuses one over its cap, rolling back).
INSERT INTO credit_balances AS c (user_id, meter, balance_micro) VALUES ($1, $2, $3)
ON CONFLICT (user_id, meter)
DO UPDATE SET balance_micro = c.balance_micro + EXCLUDED.balance_micro, updated_at = now()
RETURNING balance_micro;

-- name: insert_credit_event --
-- A credit in the ledger, written with its receipt; $1 tx_id, $2 user_id, $3 meter,
-- $4 micro-units, $5 order_id (ref), $6 caller, $7 plan_code, $8 occurred_at.
INSERT INTO ledger (tx_id, kind, user_id, meter, amount_micro, period_id, ref, reason, caller,
                    plan_code, occurred_at)
VALUES ($1, 'credit', $2, $3, $4, 'n', $5, 'payment', $6, $7, $8);

-- name: get_refund --
-- One refund; $1 refund_id.
SELECT * FROM payment_refunds WHERE refund_id = $1;

-- name: order_refunds --
-- The refunds already recorded for one order; $1 order_id.
SELECT amount::text AS amount, wanted FROM payment_refunds WHERE order_id = $1;

-- name: outbox_applied --
-- Whether a write-through change reached Redis; $1 id.
SELECT applied_at IS NOT NULL FROM redis_outbox WHERE id = $1;

-- name: pending_outbox_row --
-- One queued change if it has not reached Redis yet (no row otherwise); $1 id.
SELECT id, user_id, op, payload FROM redis_outbox WHERE id = $1 AND applied_at IS NULL;

-- name: insert_refund --
-- Record a refund; $1 refund_id, $2 order_id, $3 amount (text), $4 currency, $5 wanted (jsonb),
-- $6 plan_revoked, $7 outbox_id.
INSERT INTO payment_refunds (refund_id, order_id, amount, currency, wanted, plan_revoked,
                             outbox_id)
VALUES ($1, $2, $3::numeric, $4, $5, $6, $7);

-- name: set_refund_taken --
-- What a refund took back in Redis; $1 refund_id, $2 taken (jsonb). The first answer stays.
UPDATE payment_refunds SET taken = $2, applied_at = now()
WHERE refund_id = $1 AND taken IS NULL;

-- name: refund_events --
-- The ledger events of one refund (what it took back per meter); $1 refund_id.
SELECT meter, from_credits_micro FROM ledger WHERE kind = 'refund' AND ref = $1;

-- name: revoke_plan --
-- End a user's plan now if it is still the version a refunded receipt set; $1 user_id,
-- $2 version, $3 now. Returns the new version, or no row when the plan changed since.
UPDATE user_plans
SET expires_at = $3, version = nextval('user_plan_version_seq'), updated_at = now()
WHERE user_id = $1 AND version = $2
RETURNING version, plan_code, started_at;

-- name: insert_dead_letter --
-- Keep a notification that could not be processed; $1 source, $2 sender, $3 headers (jsonb),
-- $4 body, $5 reason. Returns its id.
INSERT INTO dead_letters (source, sender, headers, body, reason) VALUES ($1, $2, $3, $4, $5)
RETURNING id;

-- name: insert_webhook_rejection --
-- Record a notification that failed verification, keeping only the newest $5 records of
-- its sender and the newest $6 in all; $1 sender, $2 reason, $3 size, $4 body SHA-256.
-- Returns the record's id. (Every part of the statement sees the table as it was before
-- it, so the new row is not among the ones counted.)
WITH added AS (
    INSERT INTO webhook_rejections (sender, reason, size, body_sha256)
    VALUES (left($1, 128), left($2, 300), $3, $4)
    RETURNING id
), by_sender AS (
    DELETE FROM webhook_rejections
    WHERE sender = left($1, 128) AND id <= (
        SELECT id FROM webhook_rejections WHERE sender = left($1, 128)
        ORDER BY id DESC OFFSET $5::integer - 1 LIMIT 1)
), in_all AS (
    DELETE FROM webhook_rejections
    WHERE id <= (SELECT id FROM webhook_rejections ORDER BY id DESC OFFSET $6::integer - 1
                 LIMIT 1)
)
SELECT id FROM added;

-- name: list_webhook_rejections --
-- The newest records of refused notifications; $1 limit.
SELECT id, received_at, sender, reason, size, encode(body_sha256, 'hex') AS body_sha256
FROM webhook_rejections ORDER BY id DESC LIMIT $1;

-- name: list_dead_letters --
-- Dead letters, newest first; $1 include replayed ones, $2 limit.
SELECT id, received_at, source, sender, reason, status, length(body) AS size, replay_result
FROM dead_letters WHERE $1 OR status = 'new'
ORDER BY id DESC LIMIT $2;

-- name: get_dead_letter --
-- One dead letter; $1 id.
SELECT * FROM dead_letters WHERE id = $1;

-- name: mark_dead_letter_replayed --
-- An operator replayed a dead letter; $1 id, $2 result.
UPDATE dead_letters SET status = 'replayed', replayed_at = now(), replay_result = $2
WHERE id = $1;

-- name: record_replay_attempt --
-- A replay that was rejected again; $1 id, $2 result.
UPDATE dead_letters SET replay_result = $2 WHERE id = $1;

-- name: receipts_without_credit --
-- Succeeded receipts of [$1, $2) whose credits are not matched exactly once: the ledger's
-- credit events (per meter, by order id) must equal the receipt's credits, and its change
-- must have reached Redis (outbox applied).
WITH r AS (
    SELECT order_id, user_id, credits, outbox_id FROM payment_receipts
    WHERE status = 'succeeded' AND created_at >= $1 AND created_at < $2
), l AS (
    SELECT ref, jsonb_object_agg(meter, total) AS credited, sum(events) AS events
    FROM (SELECT ref, meter, sum(amount_micro) AS total, count(*) AS events FROM ledger
          WHERE kind = 'credit' AND ref IN (SELECT order_id FROM r) GROUP BY ref, meter) t
    GROUP BY ref
)
SELECT r.order_id, r.user_id, r.credits, coalesce(l.credited, '{}'::jsonb) AS credited,
       o.applied_at IS NOT NULL AS applied
FROM r
LEFT JOIN l ON l.ref = r.order_id
LEFT JOIN redis_outbox o ON o.id = r.outbox_id
WHERE coalesce(l.credited, '{}'::jsonb) <> r.credits
   OR coalesce(l.events, 0) <> (SELECT count(*) FROM jsonb_object_keys(r.credits))
   OR (r.outbox_id IS NOT NULL AND o.applied_at IS NULL);

-- name: receipts_count --
-- Succeeded receipts created in [$1, $2).
SELECT count(*) FROM payment_receipts
WHERE status = 'succeeded' AND created_at >= $1 AND created_at < $2;

-- name: ledger_ensure_partitions --
-- Create the monthly ledger partitions (UTC months) from the month of $1 to the month of
-- $2 that do not exist yet (rows the default partition holds of a month move into it);
-- how many were created. The function is in migration 0012.
SELECT ledger_ensure_partitions($1::timestamptz, $2::timestamptz);

-- name: ledger_detach_oldest --
-- Detach the oldest monthly ledger partition that ends at or before $1 (a brief lock on
-- the flow table); its name, or NULL when none is that old (migration 0012).
SELECT ledger_detach_oldest($1::timestamptz);

-- name: ledger_rollup_detached --
-- Add a detached ledger partition's rows into ledger_daily (days in the zone $1), delete
-- its debits' keys and drop it, in one transaction; its name, or NULL when none is left.
SELECT ledger_rollup_detached($1::text);

-- name: ledger_partitions --
-- The ledger's leaf partitions, oldest month first: name, its bounds as text, and the
-- planner's row estimate (reltuples; -1 never analyzed).
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bounds,
       c.reltuples::bigint AS rows_estimate,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_partition_tree('ledger') t JOIN pg_class c ON c.oid = t.relid
WHERE t.isleaf
ORDER BY c.relname;

-- name: holds_open --
-- Holds reserved (hold events flushed) that the holds table does not have yet; idempotent.
-- $1 hold_id[], $2 user_id[], $3 meter[], $4 units_micro[], $5 ref[], $6 reason[],
-- $7 caller[], $8 action[], $9 remaining_micro[], $10 created_at[], $11 expires_at[],
-- $12 expiry_tx[] (the tx id its expiry event carries: the same whoever writes it).
INSERT INTO holds (hold_id, user_id, meter, units_micro, ref, reason, caller, action,
                   remaining_micro, created_at, expires_at, expiry_tx)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::bigint[], $10::timestamptz[],
                     $11::timestamptz[], $12::uuid[])
ORDER BY 1
ON CONFLICT (hold_id) DO NOTHING;

-- name: holds_extend --
-- Later expiries of open holds (extend events); never earlier. $1 hold_id[], $2 expires_at[].
UPDATE holds h SET expires_at = greatest(h.expires_at, e.expires_at)
FROM (SELECT hold_id, max(expires_at) AS expires_at
      FROM unnest($1::text[], $2::timestamptz[]) AS t (hold_id, expires_at)
      GROUP BY hold_id) AS e
WHERE h.hold_id = e.hold_id AND h.state = 'open';

-- name: holds_close --
-- Open holds that were settled, released or expired; a hold closes once (the first event
-- read wins, later ones change nothing). $1 hold_id[], $2 state[], $3 closed_at[],
-- $4 settle_tx[], $5 settled_micro[], $6 from_allowance_micro[], $7 from_credits_micro[],
-- $8 settle_remaining_micro[].
UPDATE holds h SET state = c.state, closed_at = c.closed_at, settle_tx = c.settle_tx,
       settled_micro = c.settled, from_allowance_micro = c.fa, from_credits_micro = c.fc,
       settle_remaining_micro = c.remaining
FROM (SELECT DISTINCT ON (hold_id) *
      FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::uuid[], $5::bigint[],
                  $6::bigint[], $7::bigint[], $8::bigint[])
           AS t (hold_id, state, closed_at, settle_tx, settled, fa, fc, remaining)
      ORDER BY hold_id, closed_at) AS c
WHERE h.hold_id = c.hold_id AND h.state = 'open'
RETURNING h.meter, h.state;

-- name: open_holds_count --
-- Open holds in PostgreSQL (a gauge).
SELECT count(*) FROM holds WHERE state = 'open';

-- name: overdue_hold_users --
-- Users with holds open in PostgreSQL well past their expiry ($1 interval): their state
-- fell out of Redis before the holds expired there (the reconciler loads them, and their
-- holds expire with a ledger event). $2 limit.
SELECT DISTINCT user_id FROM holds
WHERE state = 'open' AND expires_at < now() - $1::interval
LIMIT $2;

-- name: holds_day --
-- The holds of the report day [$1, $2): how many were reserved, settled (and the units
-- settled), released and expired in it, and how many are open now.
SELECT count(*) FILTER (WHERE created_at >= $1 AND created_at < $2) AS created,
       count(*) FILTER (WHERE state = 'settled' AND closed_at >= $1 AND closed_at < $2)
           AS settled,
       coalesce(sum(settled_micro) FILTER (WHERE state = 'settled' AND closed_at >= $1
                                           AND closed_at < $2), 0)::bigint AS settled_micro,
       count(*) FILTER (WHERE state = 'released' AND closed_at >= $1 AND closed_at < $2)
           AS released,
       count(*) FILTER (WHERE state = 'expired' AND closed_at >= $1 AND closed_at < $2)
           AS expired,
       (SELECT count(*) FROM holds WHERE state = 'open') AS open_now
FROM holds
WHERE (created_at >= $1 AND created_at < $2) OR (closed_at >= $1 AND closed_at < $2);

-- name: holds_unmatched --
-- Holds the ledger does not account for: closed in [$1, $2) without exactly one closing
-- event, or with a settle whose amount is not the one recorded; and holds still open $3
-- (interval) past their expiry (their expiry never reached the ledger).
SELECT h.hold_id, h.user_id, h.meter, h.state, coalesce(h.settled_micro, 0) AS settled_micro,
       l.closings, l.committed_micro
FROM holds h
CROSS JOIN LATERAL (
    SELECT count(*) AS closings,
           coalesce(-sum(amount_micro) FILTER (WHERE kind = 'commit'), 0)::bigint
               AS committed_micro
    FROM ledger
    WHERE user_id = h.user_id AND ref = h.hold_id AND kind IN ('commit', 'release', 'expiry')
) AS l
WHERE (h.closed_at >= $1 AND h.closed_at < $2
       AND (l.closings <> 1 OR l.committed_micro <> coalesce(h.settled_micro, 0)))
   OR (h.state = 'open' AND h.expires_at < now() - $3::interval)
ORDER BY h.hold_id;

-- name: ledger_debits_by_tx --
-- The debits of the tx ids $1 (ops/upgrade.py: the old ref keys' debits).
SELECT tx_id, meter, amount_micro, reason, remaining_micro, occurred_at FROM ledger
WHERE tx_id = ANY($1::uuid[]) AND kind = 'debit';
