-- extend.lua: push an open hold's expiry to `ttl` from now (never earlier than it was).
--
-- KEYS[1]  user state hash           <prefix>:{shard}:u:<user>
-- KEYS[2]  shard ledger stream       <prefix>:{shard}:ledger
-- ARGV[1]  now, ms since epoch; 0 = use Redis TIME
-- ARGV[2]  hold id   ARGV[3] time to live from now, ms   ARGV[4] tx id of the event
-- ARGV[5]  caller    ARGV[6] idempotency TTL, ms (closed holds)   ARGV[7] user state TTL, ms
--
-- Replies:
--   OK, expires_ms
--   HOLD_GONE, 'settled'|'released'|'expired'|'unknown'
--   NOT_LOADED, 'user'
if #KEYS ~= 2 or #ARGV ~= 7 then error('qg: extend needs 2 keys and 7 arguments') end
local k_user, k_ledger = KEYS[1], KEYS[2]
local now = clock(ARGV[1])
local hold_id = ARGV[2]
local ttl = int_arg(ARGV[3], 'ttl')
local user_ttl = int_arg(ARGV[7], 'user ttl')

local function gone()
  local marker = redis.call('GET', k_user .. ':hd:' .. hold_id)
  if not marker then return {HOLD_GONE, 'unknown'} end
  return {HOLD_GONE, ({s = 'settled', r = 'released', e = 'expired'})[string.sub(marker, 1, 1)]}
end

local user = redis.call('HMGET', k_user, 'loaded', 'hx', 'plan')
if not user[1] then
  if redis.call('EXISTS', k_user .. ':hd:' .. hold_id) == 1 then return gone() end
  return {NOT_LOADED, 'user'}
end
drop_expired_holds(k_user, user[2], now, k_ledger, ARGV[6])
local k_holds = k_user .. ':h'
local text = redis.call('HGET', k_holds, hold_id)
if not text then return gone() end
local r = hold_record(text)
local expires = now + ttl
if expires < tonumber(r[3]) then expires = tonumber(r[3]) end
r[3] = istr(expires)
redis.call('HSET', k_holds, hold_id, hold_record_text(r))
redis.call('PEXPIRE', k_holds, user_ttl)
redis.call('ZADD', shard_holds_key(k_user), expires, user_of(k_user) .. '\031' .. hold_id)
first_expiry(k_user)
redis.call('XADD', k_ledger, '*', 'e', hold_event(
  'extend', ARGV[4], user_of(k_user), hold_id, r, ARGV[5], '0', '0', '0', '', user[3] or '',
  istr(now), '', r[3]))
return {OK, expires}
