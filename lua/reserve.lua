-- reserve.lua: hold `units` of one meter for a while, at most once per (user, ref). Held
-- units count against what any other debit or hold may take until the hold is settled,
-- released or expires (settle.lua, extend.lua, expire_holds.lua; _common.lua has the layout).
--
-- KEYS[1]  user state hash           <prefix>:{shard}:u:<user>
-- KEYS[2]  the user's ref buckets    <prefix>:{shard}:u:<user>:r (shared with debits)
-- KEYS[3]  shard plan catalog hash   <prefix>:{shard}:plans
-- KEYS[4]  shard ledger stream       <prefix>:{shard}:ledger
-- ARGV[1]  now, ms since epoch; 0 = use Redis TIME
-- ARGV[2]  day period id     ARGV[3] day start ms     ARGV[4] day end ms
-- ARGV[5]  month period id   ARGV[6] month end ms
-- ARGV[7]  idempotency key TTL, ms (also how long a closed hold is remembered)
-- ARGV[8]  user state TTL, ms
-- ARGV[9]  backlog limit     ARGV[10] default plan code
-- ARGV[11] meter             ARGV[12] units, micro-units (an integer > 0)
-- ARGV[13] the idempotency record: field (12 bytes), fingerprint (4), the hold id's 16
--          random bytes (_common.lua, ref_find; core/refs.py)
-- ARGV[14] hold id           ARGV[15] tx id of the hold event
-- ARGV[16] tx id its expiry will carry
-- ARGV[17] time to live, ms  ARGV[18] most open holds a user may have
-- ARGV[19] ref   ARGV[20] caller   ARGV[21] action   ARGV[22] reason
--
-- Replies:
--   OK, remaining, expires_ms, plan_code      held; remaining: what is free after it
--   DUPLICATE, hold record id, remaining      the ref was taken by this reserve before
--   REF_REUSED                                the ref was used for another request
--   INSUFFICIENT, free, limit, period, period_end_ms, plan_code, plan_status
--   TOO_MANY_HOLDS, open                      the user has the most open holds allowed
--   NOT_LOADED, 'user'|'catalog'    STALE_WINDOW, now    BACKLOG, entries
if #KEYS ~= 4 or #ARGV ~= 22 then error('qg: reserve needs 4 keys and 22 arguments') end
local k_user, k_ref, k_plans, k_ledger = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = clock(ARGV[1])
local units_arg = ARGV[12]
if not string.find(units_arg, '^[1-9]%d*$') then
  error('qg: units must be a positive integer: ' .. tostring(units_arg))
end
local units = int_arg(units_arg, 'units')
local ttl = int_arg(ARGV[17], 'ttl')
local max_open = int_arg(ARGV[18], 'max open holds')
local user_ttl = int_arg(ARGV[8], 'user ttl')
local marker_ttl = ARGV[7]
if now < int_arg(ARGV[3], 'day start') or now >= int_arg(ARGV[4], 'day end') then
  return {STALE_WINDOW, now}
end
local meter = ARGV[11]
local field, head = string.sub(ARGV[13], 1, 12), string.sub(ARGV[13], 13)
local ref_w, ref_r = ref_window(ARGV[7])
local user = redis.call('HMGET', k_user, 'loaded', 'plan', 'exp', 'cr:' .. meter,
                        'n:' .. meter, 'ps', 'pv', 'hx', 'h:' .. meter)
if not user[1] then return {NOT_LOADED, 'user'} end
-- A ref already taken answers what its first reserve answered, whatever holds now.
local prior, k_bucket, bucket_exists, bucket = ref_find(k_ref, field, now, ref_w, ref_r)
if prior then return prior_reply(prior, head) end
if redis.call('XLEN', k_ledger) >= int_arg(ARGV[9], 'backlog limit') then
  return {BACKLOG, redis.call('XLEN', k_ledger)}
end
if user[8] and drop_expired_holds(k_user, user[8], now, k_ledger, marker_ttl) > 0 then
  user[9] = redis.call('HGET', k_user, 'h:' .. meter)
end

local code, status = plan_in_force(user[2], user[3], now, ARGV[10])
local plan = redis.call('HMGET', k_plans, code, code .. '|' .. meter)
if not plan[1] then return {NOT_LOADED, 'catalog'} end
local period, limit, since = parse_rule(plan[2])
local _, kind, _, end_ms, used = meter_place(
  k_user, meter, period, since, int_or_zero(user[6]), int_or_zero(user[7]),
  int_or_zero(user[3]), {ARGV[2], int_arg(ARGV[4], 'day end')},
  {ARGV[5], int_arg(ARGV[6], 'month end')}, user[5])
local allowance = limit - used
if allowance < 0 then allowance = 0 end
local free = allowance + stored_int(user[4], 'credits') - int_or_zero(user[9])
if units > free then
  if free < 0 then free = 0 end
  return {INSUFFICIENT, free, limit, kind, end_ms, code, status}
end
local open = redis.call('HLEN', k_user .. ':h')
if open >= max_open then
  return {TOO_MANY_HOLDS, open}
end

local remaining = free - units

-- From here on only writes.
ref_take(k_bucket, bucket_exists, bucket, field, head, now, ref_w, ref_r, remaining)
local hold_id, expires = ARGV[14], now + ttl
local r = {meter, units_arg, istr(expires), ARGV[16], ARGV[19], ARGV[20], ARGV[21], ARGV[22]}
local k_holds = k_user .. ':h'
redis.call('HSET', k_holds, hold_id, hold_record_text(r))
redis.call('PEXPIRE', k_holds, user_ttl)
redis.call('HINCRBY', k_user, 'h:' .. meter, units)
local first = int_or_zero(redis.call('HGET', k_user, 'hx'))
if first == 0 or expires < first then redis.call('HSET', k_user, 'hx', istr(expires)) end
redis.call('ZADD', shard_holds_key(k_user), expires, user_of(k_user) .. '\031' .. hold_id)
redis.call('XADD', k_ledger, '*', 'e', hold_event(
  'hold', ARGV[15], user_of(k_user), hold_id, r, ARGV[20], '0', '0', '0', '', code,
  istr(now), istr(remaining), r[3]))
redis.call('PEXPIRE', k_user, user_ttl)
redis.call('HSET', k_user, 'xt', istr(now + user_ttl))
return {OK, remaining, expires, code}
