-- apply_payment.lua: apply a credit or a refund already committed in PostgreSQL, at most once
-- per outbox row (the marker field 'ob:<id>' in the user hash remembers it).
--
-- KEYS[1]  user state hash       <prefix>:{shard}:u:<user>
-- KEYS[2]  shard ledger stream   <prefix>:{shard}:ledger
-- ARGV[1]  operation: 'credit' or 'refund'
-- ARGV[2]  outbox id (redis_outbox.id): the identity of this change
-- ARGV[3]  plan code to write ('' = leave the plan alone)
-- ARGV[4]  plan expiry ms (0 = none)     ARGV[5] plan version (user_plans.version)
-- ARGV[6]  user state TTL, ms
-- ARGV[7]  now, ms since epoch; 0 = use Redis TIME (refund events only; the hot path
--          passes its own clock, the time it also gives the same events it writes through)
-- ARGV[8]  caller name    ARGV[9] ref: the order id (credit) or the refund id (refund)
-- ARGV[10] user id
-- ARGV[11] n, then n triples: meter, amount in micro-units, transaction id
-- ARGV[12 + 3n]  the plan assignment's start ms (0 = not known)
--
-- Replies:
--   {OK, result, plan}   applied now; result is 'meter=micro,...' of what was added (credit)
--                        or taken back (refund); 'deferred' for a credit to a user whose state
--                        is not in Redis (PostgreSQL already holds it: the load brings it);
--                        plan: the user's plan code in Redis, as the refund events carry it
--   {DUPLICATE, result, plan}  this outbox row was applied before ('loaded' when the user
--                        was loaded from PostgreSQL after the change was committed)
--   {NOT_LOADED, 'user'} a refund needs the user's state: load it and call again
--
-- A credit adds to 'cr:<meter>'. A refund takes back at most what is left of each meter's
-- credits (credits already spent cannot be taken back) and appends one 'refund' ledger event
-- per meter, with the amount it wanted in the reason, for the reconciler to flush.
local op = ARGV[1]
if op ~= 'credit' and op ~= 'refund' then error('qg: unknown payment operation ' .. op) end
local marker = 'ob:' .. int_arg(ARGV[2], 'outbox id')
local version = int_arg(ARGV[5], 'plan version')
int_arg(ARGV[4], 'plan expiry')
local ttl = int_arg(ARGV[6], 'user ttl')
local n = int_arg(ARGV[11], 'pair count')
if #ARGV ~= 12 + 3 * n then error('qg: apply_payment needs three values per meter') end
local plan_start = ARGV[12 + 3 * n]
int_arg(plan_start, 'plan start')
for i = 0, n - 1 do int_arg(ARGV[13 + 3 * i], 'amount') end

local state = redis.call('HMGET', KEYS[1], 'loaded', marker, 'pv', 'plan')
if state[2] then return {DUPLICATE, state[2], state[4] or ''} end
local loaded = state[1] ~= false
if op == 'refund' and not loaded then return {NOT_LOADED, 'user'} end

-- The plan, when this change carries one and Redis holds an older version.
if ARGV[3] ~= '' and int_or_zero(state[3]) < version then
  redis.call('HSET', KEYS[1], 'plan', ARGV[3], 'exp', ARGV[4], 'pv', ARGV[5], 'ps', plan_start)
end

local result = {}
local code = ''
if op == 'credit' then
  if loaded then
    for i = 0, n - 1 do  -- every sum checked before the first write
      local have = stored_int(redis.call('HGET', KEYS[1], 'cr:' .. ARGV[12 + 3 * i]), 'credits')
      if have + tonumber(ARGV[13 + 3 * i]) >= EXACT then
        error('qg: credits would pass 2^53: ' .. ARGV[12 + 3 * i])
      end
    end
    for i = 0, n - 1 do
      local meter, amount = ARGV[12 + 3 * i], tonumber(ARGV[13 + 3 * i])
      redis.call('HINCRBY', KEYS[1], 'cr:' .. meter, amount)
      result[#result + 1] = meter .. '=' .. istr(amount)
    end
  else
    result = {'deferred'}
  end
else
  local now = clock(ARGV[7])
  code = redis.call('HGET', KEYS[1], 'plan') or ''
  for i = 0, n - 1 do
    local meter, wanted, tx = ARGV[12 + 3 * i], tonumber(ARGV[13 + 3 * i]), ARGV[14 + 3 * i]
    local have = stored_int(redis.call('HGET', KEYS[1], 'cr:' .. meter), 'credits')
    local take = math.min(wanted, math.max(have, 0))
    if take > 0 then redis.call('HINCRBY', KEYS[1], 'cr:' .. meter, -take) end
    redis.call('XADD', KEYS[2], '*', 'e', table.concat({
      'v1', 'refund', tx, ARGV[10], meter, istr(-take), '0', istr(take), 'n', ARGV[9],
      'wanted=' .. istr(wanted), ARGV[8], '', code, istr(now)}, '\031'))
    result[#result + 1] = meter .. '=' .. istr(take)
  end
end
local text = table.concat(result, ',')
if loaded then redis.call('HSET', KEYS[1], marker, text) end
-- A load that read PostgreSQL before this change must read it again.
redis.call('HINCRBY', KEYS[1], 'wg', 1)
redis.call('PEXPIRE', KEYS[1], ttl)
return {OK, text, code}
