-- 0011: reservations (holds) for work whose cost is known only at the end.
--
-- A hold takes `units` of a meter out of what any other debit or hold may take, until it is
-- settled (the actual cost debited, the rest given back), released, or expires. Redis keeps
-- the open holds; the reconciler writes every hold event to the ledger and keeps this table
-- in step with them, so that a rebuild after Redis lost its data opens the same holds with
-- the same expiry, and a repeated settle answers its first result.
--
-- Ledger rows of holds carry the hold id in `ref` (the caller's ref of the reserve is in
-- holds.ref): 'hold' (amount 0), 'extend' (amount 0), 'commit' (a settle: the debited amount
-- and its split, counted in usage and credits like a debit), 'release' and 'expiry'
-- (amount 0). Only 'commit' rows move usage or credits.
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('debit', 'credit', 'refund', 'plan', 'hold', 'commit', 'release',
                    'expiry', 'extend'));
ALTER TABLE ledger ADD CONSTRAINT ledger_commit_split
    CHECK (kind <> 'commit' OR amount_micro = -(from_allowance_micro + from_credits_micro));

-- Overdraft: how far past what is free a settle may take a meter (usage past the
-- allowance, forgiven when the period resets). 0: a settle never takes more than is free.
ALTER TABLE plan_meters ADD COLUMN overdraft_micro bigint NOT NULL DEFAULT 0
    CHECK (overdraft_micro >= 0);

CREATE TABLE holds (
    hold_id          text PRIMARY KEY,
    user_id          text NOT NULL,
    meter            text NOT NULL,
    units_micro      bigint NOT NULL CHECK (units_micro > 0),
    ref              text NOT NULL,
    reason           text,
    caller           text NOT NULL DEFAULT '',
    action           text,
    -- what was left of the meter right after the reserve (a retried reserve answers it)
    remaining_micro  bigint NOT NULL DEFAULT 0,
    -- the tx id its expiry will carry (chosen at the reserve: whichever script expires the
    -- hold writes the same event)
    expiry_tx        uuid NOT NULL,
    state            text NOT NULL DEFAULT 'open'
                     CHECK (state IN ('open', 'settled', 'released', 'expired')),
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    closed_at        timestamptz,
    -- a settle's result, answered again to a repeat of it
    settle_tx        uuid,
    settled_micro    bigint,
    from_allowance_micro bigint,
    from_credits_micro   bigint,
    settle_remaining_micro bigint,
    CHECK ((state = 'open') = (closed_at IS NULL)),
    CHECK ((state = 'settled') = (settle_tx IS NOT NULL))
);
CREATE INDEX holds_user_open ON holds (user_id) WHERE state = 'open';
CREATE INDEX holds_user_closed ON holds (user_id, closed_at) WHERE state <> 'open';
CREATE INDEX holds_open_expiry ON holds (expires_at) WHERE state = 'open';
