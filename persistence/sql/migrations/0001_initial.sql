-- 0001: plans, user plans, the ledger and the counters it feeds.
-- Every counter is NOT NULL DEFAULT 0 (seed 004: NULL counters crashed the limit check).

CREATE SEQUENCE catalog_version_seq;
CREATE SEQUENCE user_plan_version_seq;

CREATE TABLE plans (
    plan_code     text PRIMARY KEY CHECK (plan_code ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    duration_days integer CHECK (duration_days IS NULL OR duration_days BETWEEN 1 AND 3660),
    price         numeric(18, 2) NOT NULL DEFAULT 0 CHECK (price >= 0),
    currency      text NOT NULL DEFAULT 'RUB' CHECK (currency ~ '^[A-Z]{3}$'),
    version       bigint NOT NULL DEFAULT nextval('catalog_version_seq'),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plan_meters (
    plan_code   text NOT NULL REFERENCES plans (plan_code) ON DELETE CASCADE,
    meter       text NOT NULL CHECK (meter ~ '^[a-z][a-z0-9_]{0,31}$'),
    period      text NOT NULL CHECK (period IN ('day', 'month', 'none')),
    limit_micro bigint NOT NULL DEFAULT 0 CHECK (limit_micro >= 0),
    PRIMARY KEY (plan_code, meter)
);

CREATE TABLE user_plans (
    user_id    text PRIMARY KEY,
    plan_code  text NOT NULL REFERENCES plans (plan_code),
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    version    bigint NOT NULL DEFAULT nextval('user_plan_version_seq'),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per accepted state change, written by the reconciler from the shard streams
-- (debits) or directly in the transaction of a write-through change (plans, credits).
CREATE TABLE ledger (
    tx_id                uuid PRIMARY KEY,
    kind                 text NOT NULL
                         CHECK (kind IN ('debit', 'credit', 'refund', 'plan', 'hold', 'commit',
                                         'release', 'expiry')),
    user_id              text NOT NULL,
    meter                text NOT NULL DEFAULT '',
    amount_micro         bigint NOT NULL DEFAULT 0,
    from_allowance_micro bigint NOT NULL DEFAULT 0 CHECK (from_allowance_micro >= 0),
    from_credits_micro   bigint NOT NULL DEFAULT 0 CHECK (from_credits_micro >= 0),
    period_id            text NOT NULL DEFAULT '',
    ref                  text,
    reason               text,
    caller               text NOT NULL DEFAULT '',
    action               text,
    plan_code            text,
    shard                integer,
    stream_id            text,
    occurred_at          timestamptz NOT NULL,
    recorded_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (kind <> 'debit' OR amount_micro = -(from_allowance_micro + from_credits_micro))
);
CREATE INDEX ledger_user_time ON ledger (user_id, occurred_at DESC, tx_id DESC);
CREATE INDEX ledger_user_ref ON ledger (user_id, ref) WHERE ref IS NOT NULL;
CREATE INDEX ledger_occurred ON ledger (occurred_at);

-- Period usage, advanced only by ledger rows really inserted.
CREATE TABLE usage_counters (
    user_id    text NOT NULL,
    meter      text NOT NULL,
    period_id  text NOT NULL,
    used_micro bigint NOT NULL DEFAULT 0 CHECK (used_micro >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, meter, period_id)
);

CREATE TABLE credit_balances (
    user_id       text NOT NULL,
    meter         text NOT NULL,
    balance_micro bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, meter)
);

-- Write-through changes (plan assignments, credits) committed here but not yet applied to
-- Redis. The request applies its row right after the commit; the reconciler applies any row
-- left behind (Redis down, a crash in between). Applying is idempotent (versions, order ids).
CREATE TABLE redis_outbox (
    id         bigserial PRIMARY KEY,
    user_id    text NOT NULL,
    op         text NOT NULL CHECK (op IN ('plan', 'credit', 'refund')),
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    applied_at timestamptz
);
CREATE INDEX redis_outbox_pending ON redis_outbox (id) WHERE applied_at IS NULL;
