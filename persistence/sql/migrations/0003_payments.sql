-- 0003: payments. Receipts and refunds are written through (PostgreSQL first, then Redis by
-- the outbox); notifications that cannot be processed are kept whole as dead letters.

-- One row per order: a credit through the API, or a payment notification. A payment's
-- credits are written in the same transaction as the receipt (ledger rows of kind 'credit',
-- credit_balances, and the redis_outbox row that applies them in Redis).
CREATE TABLE payment_receipts (
    order_id        text PRIMARY KEY,
    payment_id      text UNIQUE,              -- the provider's payment id (webhooks)
    user_id         text NOT NULL,
    plan_code       text REFERENCES plans (plan_code),
    status          text NOT NULL CHECK (status IN ('succeeded', 'canceled')),
    amount          numeric(18, 2) NOT NULL DEFAULT 0 CHECK (amount >= 0),
    currency        text NOT NULL DEFAULT 'RUB' CHECK (currency ~ '^[A-Z]{3}$'),
    credits         jsonb NOT NULL DEFAULT '{}',  -- meter -> micro-units (integers)
    fingerprint     text NOT NULL,            -- what makes a repeated order "the same"
    source          text NOT NULL CHECK (source IN ('api', 'webhook', 'replay')),
    caller          text NOT NULL DEFAULT '',
    plan_expires_at timestamptz,
    plan_version    bigint,                   -- user_plans.version this receipt set
    tx_id           uuid,                     -- the receipt's plan ledger event
    outbox_id       bigint REFERENCES redis_outbox (id),
    result          jsonb NOT NULL DEFAULT '{}',  -- the answer given, repeated on a retry
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payment_receipts_user ON payment_receipts (user_id);
CREATE INDEX payment_receipts_created ON payment_receipts (created_at);

-- One row per refund (the provider's refund id). `wanted` is what the refund takes back;
-- `taken` is what Redis could still take (credits already spent cannot be taken back);
-- it is filled when the refund reaches Redis.
CREATE TABLE payment_refunds (
    refund_id    text PRIMARY KEY,
    order_id     text NOT NULL REFERENCES payment_receipts (order_id),
    amount       numeric(18, 2) NOT NULL CHECK (amount > 0),
    currency     text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    wanted       jsonb NOT NULL,
    taken        jsonb,
    plan_revoked boolean NOT NULL DEFAULT false,
    outbox_id    bigint REFERENCES redis_outbox (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    applied_at   timestamptz
);
CREATE INDEX payment_refunds_order ON payment_refunds (order_id);

-- A notification that could not be processed, kept whole for an operator to fix and replay.
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    source        text NOT NULL,
    sender        text NOT NULL DEFAULT '',
    headers       jsonb NOT NULL DEFAULT '{}',
    body          bytea NOT NULL,
    reason        text NOT NULL,
    status        text NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'replayed')),
    replayed_at   timestamptz,
    replay_result text
);
CREATE INDEX dead_letters_new ON dead_letters (id) WHERE status = 'new';
