-- settle.lua: end an open hold. 'settle' debits the actual cost and gives back the rest;
-- 'release' gives back all of it. Both once per hold: a repeat answers the first result.
--
-- A settle may take more than the hold kept: the excess comes from what is free at settle
-- time, and past it up to the plan's overdraft for the meter (catalog field
-- '<plan>|<meter>|o'; none: 0). Beyond that it answers INSUFFICIENT with what could be
-- taken and changes nothing, unless `partial` asks to take that much. Overdraft is usage
-- past the allowance (and credits); the meter's total overshoot never passes the overdraft.
--
-- KEYS[1]  user state hash           <prefix>:{shard}:u:<user>
-- KEYS[2]  shard plan catalog hash   <prefix>:{shard}:plans
-- KEYS[3]  shard ledger stream       <prefix>:{shard}:ledger
--          (the hold's keys, and the meter's counters, are built from KEYS[1]: its slot)
-- ARGV[1]  now, ms since epoch; 0 = use Redis TIME
-- ARGV[2]  day period id     ARGV[3] day start ms     ARGV[4] day end ms
-- ARGV[5]  month period id   ARGV[6] month end ms
-- ARGV[7]  idempotency TTL, ms: how long the closed hold's result is remembered
-- ARGV[8]  grace kept after a period's end before its counter expires, ms
-- ARGV[9]  default plan code
-- ARGV[10] hold id   ARGV[11] 'settle' or 'release'
-- ARGV[12] actual units, micro-units (settle; >= 0)   ARGV[13] partial: '1' or '0'
-- ARGV[14] tx id of this event       ARGV[15] caller
--
-- Replies:
--   OK, settled, from_allowance, from_credits, remaining, released, tx_id, meter
--       (release: settled 0; remaining: what is free after it)
--   DUPLICATE, <the same values but the meter>   the hold was closed this way before
--   HOLD_GONE, 'settled'|'released'|'expired'|'unknown'
--   INSUFFICIENT, available, limit, period, period_end_ms, plan_code, plan_status
--   NOT_LOADED, 'user'|'catalog'    STALE_WINDOW, now
if #KEYS ~= 3 or #ARGV ~= 15 then error('qg: settle needs 3 keys and 15 arguments') end
local k_user, k_plans, k_ledger = KEYS[1], KEYS[2], KEYS[3]
local now = clock(ARGV[1])
local hold_id, op = ARGV[10], ARGV[11]
if op ~= 'settle' and op ~= 'release' then error('qg: unknown settle operation ' .. op) end
local actual = int_arg(ARGV[12], 'units')
local marker_ttl = ARGV[7]
if now < int_arg(ARGV[3], 'day start') or now >= int_arg(ARGV[4], 'day end') then
  return {STALE_WINDOW, now}
end

-- A closed hold: the first result again, or why it cannot be closed this way.
local function closed(marker)
  local v = hold_record(marker)
  local state = ({s = 'settled', r = 'released', e = 'expired'})[v[1]]
  if (state == 'settled' and op == 'settle') or (state == 'released' and op == 'release') then
    return {DUPLICATE, tonumber(v[2]), tonumber(v[3]), tonumber(v[4]), tonumber(v[5]),
            tonumber(v[6]), v[7]}
  end
  return {HOLD_GONE, state}
end

local user = redis.call('HMGET', k_user, 'loaded', 'hx', 'plan', 'exp', 'ps', 'pv')
if not user[1] then
  local marker = redis.call('GET', k_user .. ':hd:' .. hold_id)
  if marker then return closed(marker) end
  return {NOT_LOADED, 'user'}
end
drop_expired_holds(k_user, user[2], now, k_ledger, marker_ttl)
local text = redis.call('HGET', k_user .. ':h', hold_id)
if not text then
  local marker = redis.call('GET', k_user .. ':hd:' .. hold_id)
  if marker then return closed(marker) end
  return {HOLD_GONE, 'unknown'}
end
local r = hold_record(text)
local meter, units = r[1], tonumber(r[2])
local code, status = plan_in_force(user[3], user[4], now, ARGV[9])
local plan = redis.call('HMGET', k_plans, code, code .. '|' .. meter, code .. '|' .. meter .. '|o')
if not plan[1] then return {NOT_LOADED, 'catalog'} end
local period, limit, since = parse_rule(plan[2])
local expires = int_or_zero(user[4])
local state = redis.call('HMGET', k_user, 'cr:' .. meter, 'n:' .. meter, 'h:' .. meter)
local counter, kind, period_id, end_ms, used = meter_place(
  k_user, meter, period, since, int_or_zero(user[5]), int_or_zero(user[6]), expires,
  {ARGV[2], int_arg(ARGV[4], 'day end')}, {ARGV[5], int_arg(ARGV[6], 'month end')}, state[2])
local credits = stored_int(state[1], 'credits')
local others = int_or_zero(state[3]) - units  -- held by the user's other holds

if op == 'settle' then
  -- What this hold may take: what is left, not floored (usage already past the limit
  -- counts against the overdraft), beside the other holds, plus the overdraft.
  local cap = limit - used + credits - others + int_or_zero(plan[3])
  if cap < 0 then cap = 0 end
  if actual > cap then
    if ARGV[13] ~= '1' then return {INSUFFICIENT, cap, limit, kind, end_ms, code, status} end
    actual = cap
  end
else
  actual = 0
end

-- Writes. The debit: from the allowance first, then credits, the rest (overdraft) as usage.
local allowance = limit - used
if allowance < 0 then allowance = 0 end
local fa = math.min(actual, allowance)
local fc = math.min(actual - fa, credits)
fa = actual - fc
if fa > 0 then
  if counter then
    if redis.call('INCRBY', counter, fa) == fa then
      redis.call('PEXPIRE', counter, end_ms + int_arg(ARGV[8], 'grace') - now)
    end
  else
    redis.call('HINCRBY', k_user, 'n:' .. meter, fa)
  end
end
if fc > 0 then redis.call('HINCRBY', k_user, 'cr:' .. meter, -fc) end
allowance = limit - used - fa
if allowance < 0 then allowance = 0 end
local remaining = allowance + credits - fc - others
if remaining < 0 then remaining = 0 end
local released = units - actual
if released < 0 then released = 0 end
local tx = ARGV[14]
local result = {istr(actual), istr(fa), istr(fc), istr(remaining), istr(released), tx}
close_hold(k_user, hold_id, r, string.sub(op, 1, 1) .. '\031' .. table.concat(result, '\031'),
           marker_ttl)
if op == 'settle' then
  redis.call('XADD', k_ledger, '*', 'e', hold_event(
    'commit', tx, user_of(k_user), hold_id, r, ARGV[15], actual > 0 and '-' .. istr(actual) or '0',
    istr(fa), istr(fc), period_id, code, istr(now), istr(remaining), ''))
else
  redis.call('XADD', k_ledger, '*', 'e', hold_event(
    'release', tx, user_of(k_user), hold_id, r, ARGV[15], '0', '0', '0', '', code, istr(now),
    istr(remaining), ''))
end
return {OK, actual, fa, fc, remaining, released, tx, meter}
