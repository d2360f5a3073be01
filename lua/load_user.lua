-- load_user.lua: write a user's state read from PostgreSQL, only where Redis lacks it.
-- Missing state is not zero usage: the hot path calls this after a NOT_LOADED answer.
--
-- KEYS[1]     user state hash                    <prefix>:{shard}:u:<user>
-- KEYS[1+i]   period counter i (day or month)    <prefix>:{shard}:u:<user>:c:<meter>:<kind>:<id>
-- ARGV[1]     write generation seen before PostgreSQL was read ('0' when none)
-- ARGV[2]     assigned plan code      ARGV[3] plan expiry ms (0 = none)
-- ARGV[4]     plan version in PostgreSQL (user_plans.version, 0 = default plan)
-- ARGV[5]     user state TTL, ms
-- ARGV[6]     now ms (0 = Redis TIME): counters expire relative to it
-- ARGV[7]     the assignment's start ms (0 = the default plan, or not known)
-- ARGV[8]     c = number of credit balances, then c pairs: meter, micro-units
-- then        u = number of lifetime ('none' period) usages, then u pairs: meter, micro-units
-- then        o = number of payment changes (redis_outbox ids) the credits read from
--             PostgreSQL already include though not applied in Redis yet, then o ids
-- then        h = number of open holds (PostgreSQL's holds table), then h triples: hold id,
--             record (_common.lua, hold_record), expires ms; a hold Redis has is kept
-- then        the idempotency TTL ms, then r = number of idempotency records of the
--             user's recent debits to put back (restore_refs.lua's), then r triples: field
--             and head, remaining micro-units, the debit's time ms (the loader passes the
--             ledger's first page here, and restores longer histories before this call)
-- then        for each KEYS[1+i]: used micro-units, expire-at ms
--
-- Reply: {1, records written} loaded; {0} already loaded (nothing written); {-1} a
-- write-through changed the user since ARGV[1] was read: read PostgreSQL again and retry.
local state = redis.call('HMGET', KEYS[1], 'loaded', 'wg', 'pv')
if state[1] then return {0} end
if (state[2] or '0') ~= ARGV[1] then return {-1} end

local ttl = int_arg(ARGV[5], 'user ttl')
local now = clock(ARGV[6])
local i = 8
local fields = {'loaded', '1'}
-- A plan written through after our read carries a newer version: keep it.
if int_or_zero(state[3]) <= int_arg(ARGV[4], 'plan version') then
  int_arg(ARGV[7], 'plan start')
  for _, v in ipairs({'plan', ARGV[2], 'exp', ARGV[3], 'pv', ARGV[4], 'ps', ARGV[7]}) do
    fields[#fields + 1] = v
  end
end
local c = int_arg(ARGV[i], 'credit count'); i = i + 1
for _ = 1, c do
  fields[#fields + 1] = 'cr:' .. ARGV[i]
  fields[#fields + 1] = istr(int_arg(ARGV[i + 1], 'credits'))
  i = i + 2
end
local u = int_arg(ARGV[i], 'usage count'); i = i + 1
local lifetime = {}
for _ = 1, u do
  lifetime[#lifetime + 1] = {ARGV[i], int_arg(ARGV[i + 1], 'usage')}
  i = i + 2
end
local o = int_arg(ARGV[i], 'outbox count'); i = i + 1
for _ = 1, o do
  -- apply_payment.lua must not add these again: mark them applied.
  fields[#fields + 1] = 'ob:' .. int_arg(ARGV[i], 'outbox id')
  fields[#fields + 1] = 'loaded'
  i = i + 1
end
local h = int_arg(ARGV[i], 'hold count'); i = i + 1
local holds = {}
for _ = 1, h do
  holds[#holds + 1] = {ARGV[i], ARGV[i + 1], int_arg(ARGV[i + 2], 'hold expiry')}
  i = i + 3
end
local ref_w, ref_r = ref_window(ARGV[i])
local recs
recs, i = ref_records(int_arg(ARGV[i + 1], 'record count'), i + 2)
if #ARGV ~= i - 1 + 2 * (#KEYS - 1) then error('qg: load_user needs two values per counter') end

-- Validate before the first write: Lua in Redis has no rollback.
for k = 2, #KEYS do
  int_arg(ARGV[i + 2 * (k - 2)], 'counter'); int_arg(ARGV[i + 2 * (k - 2) + 1], 'expire-at')
end

local restored = refs_restore(KEYS[1] .. ':r', recs, now, ref_w, ref_r)
redis.call('HSET', KEYS[1], unpack(fields))
for _, pair in ipairs(lifetime) do
  -- Usage in Redis may be ahead of PostgreSQL (events not flushed yet): keep the larger.
  local have = int_or_zero(redis.call('HGET', KEYS[1], 'n:' .. pair[1]))
  if pair[2] > have then redis.call('HSET', KEYS[1], 'n:' .. pair[1], istr(pair[2])) end
end
for k = 2, #KEYS do
  local used = tonumber(ARGV[i]); local expire_at = tonumber(ARGV[i + 1]); i = i + 2
  local have = int_or_zero(redis.call('GET', KEYS[k]))
  if used > have then redis.call('SET', KEYS[k], istr(used)) end
  if redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('PEXPIRE', KEYS[k], expire_at - now)
  end
end
-- Holds: the ones Redis lacks, then what they keep per meter and the first expiry, from
-- every open hold Redis now has (a due one expires when a script next touches the user).
if h > 0 or redis.call('EXISTS', KEYS[1] .. ':h') == 1 then
  local k_holds, k_zset, user_id = KEYS[1] .. ':h', shard_holds_key(KEYS[1]), user_of(KEYS[1])
  for _, hold in ipairs(holds) do
    if redis.call('HSETNX', k_holds, hold[1], hold[2]) == 1 then
      redis.call('ZADD', k_zset, hold[3], user_id .. '\031' .. hold[1])
    end
  end
  local held = {}
  local all = redis.call('HGETALL', k_holds)
  for j = 2, #all, 2 do
    local r = hold_record(all[j])
    held[r[1]] = (held[r[1]] or 0) + tonumber(r[2])
  end
  for meter, units in pairs(held) do redis.call('HSET', KEYS[1], 'h:' .. meter, istr(units)) end
  first_expiry(KEYS[1])
  redis.call('PEXPIRE', k_holds, ttl)
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, restored}
