-- 0002: what the reconciler needs besides the ledger: poison entries and report summaries.

-- A ledger stream entry that could not be written (malformed, or refused by a constraint),
-- kept whole with its error instead of blocking its shard.
CREATE TABLE poison_events (
    id         bigserial PRIMARY KEY,
    shard      integer NOT NULL,
    stream_id  text NOT NULL,
    fields     jsonb NOT NULL,
    error      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (shard, stream_id)
);

-- One row per nightly reconciliation run.
CREATE TABLE reconciliation_reports (
    id          bigserial PRIMARY KEY,
    report_date date NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    drift_count integer NOT NULL DEFAULT 0 CHECK (drift_count >= 0),
    summary     jsonb NOT NULL
);
CREATE INDEX reconciliation_reports_date ON reconciliation_reports (report_date);
