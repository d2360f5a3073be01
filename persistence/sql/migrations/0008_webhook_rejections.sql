-- 0008: notifications that fail verification are not kept whole.
--
-- Anyone can post to the payment webhook. A notification that passed verification and
-- still cannot be processed is a dead letter, kept whole for an operator to fix and replay;
-- one that failed verification (or was too large to verify) is only recorded: who sent it,
-- why it was refused, its size and the SHA-256 of its body. The records are bounded: the
-- service keeps the newest per sender and in total (payments/webhook.py), so forged posts
-- cannot fill the database.
CREATE TABLE webhook_rejections (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    sender       text NOT NULL,
    reason       text NOT NULL,
    size         integer NOT NULL,
    body_sha256  bytea NOT NULL
);
CREATE INDEX webhook_rejections_sender ON webhook_rejections (sender, id);
