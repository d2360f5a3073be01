--@include _debit.lua
-- debit_many.lua: a batch of debits in one call, each exactly as debit.lua would run it,
-- one after the other (two debits with the same ref: the second one is a DUPLICATE or a
-- REF_REUSED). Each debit is atomic, and so is the batch as a whole. The hot path sends
-- the debits its workers issued in one event-loop tick as one call (lua/connection.py).
--
-- n = #KEYS / 6 debits (the caller keeps n small: at most 32).
-- KEYS[6i-5 .. 6i]  the six keys of debit i, in debit.lua's order: user state hash,
--                   idempotency key, shard plan catalog, day counter, month counter, shard
--                   ledger stream (debits of different shards may share a batch on a single
--                   Redis; Redis Cluster would need one batch per hash slot)
-- ARGV[1]   now, ms since epoch; 0 = use Redis TIME (read once for the whole batch)
-- ARGV[2]   day period id      ARGV[3] day start ms    ARGV[4] day end ms
-- ARGV[5]   month period id    ARGV[6] month start ms  ARGV[7] month end ms
-- ARGV[8]   idempotency key TTL, ms
-- ARGV[9]   grace kept after a period's end before its counter expires, ms
-- ARGV[10]  user state TTL, ms
-- ARGV[11]  backlog limit: refuse when the shard stream holds this many entries
-- ARGV[12]  default plan code
-- ARGV[13+9(i-1) .. 21+9(i-1)]  debit i: user id, meter, amount (micro-units, integer > 0),
--           ref, fingerprint, reason, caller name, transaction id, action
--
-- Reply: n replies, reply i being what debit.lua answers for debit i, or an error reply
-- when debit i raised one (a bad argument, a wrong key type); the other debits still run.
local HEADER, PER_DEBIT = 12, 9
local n = #KEYS / 6
if n < 1 or n ~= math.floor(n) or #ARGV ~= HEADER + PER_DEBIT * n then
  error('qg: debit_many needs six keys and nine arguments per debit')
end
local ctx = debit_context(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12])
local replies = {}
for i = 1, n do
  local k, a = 6 * (i - 1), HEADER + PER_DEBIT * (i - 1)
  local ok, reply = pcall(debit_one, ctx, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
    KEYS[k + 5], KEYS[k + 6], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5],
    ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9])
  if ok then
    replies[i] = reply
  elseif type(reply) == 'table' and reply.err then
    replies[i] = reply
  else
    replies[i] = {err = tostring(reply)}
  end
end
debit_finish(ctx)
return replies
