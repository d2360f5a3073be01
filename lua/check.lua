-- check.lua: read-only view of a user's plan and the remaining amount of some meters.
--
-- KEYS[1]          user state hash           <prefix>:{shard}:u:<user>
-- KEYS[2]          shard plan catalog hash   <prefix>:{shard}:plans
-- KEYS[1+2i]       day counter of meter i    <prefix>:{shard}:u:<user>:c:<meter>:d:<day id>
-- KEYS[2+2i]       month counter of meter i  <prefix>:{shard}:u:<user>:c:<meter>:m:<month id>
-- ARGV[1]          now, ms since epoch; 0 = use Redis TIME
-- ARGV[2], ARGV[3] day start and end ms      ARGV[4], ARGV[5] month start and end ms
-- ARGV[6]          default plan code
-- ARGV[7]          '1': every meter of the plan must be among the ones asked for
-- ARGV[7+i]        meter i (i = 1..n, n = #ARGV - 7, KEYS hold 2 + 2n keys)
--
-- Replies:
--   {OK, plan_code, plan_status, assigned_code, expires_ms, n,
--    then n times: meter, period, limit, used, credits, remaining, period_end_ms, held}
--   (held: units kept by open holds, not counting the ones past their expiry, which the
--   next script that writes expires; remaining is what is left after them)
--   (period 'c', a cycle: counted from the assignment's start, ending at its expiry; a
--   cycle meter of an assignment older than the cycle rule counts by month: 'm')
--   {NOT_LOADED, 'user'|'catalog'}
--   {STALE_WINDOW, now}
--   {NEED_METERS, 'a,b,c'}   the plan names meters that were not asked for
local now = clock(ARGV[1])
local day_end, month_end = int_arg(ARGV[3], 'day end'), int_arg(ARGV[5], 'month end')
if now < int_arg(ARGV[2], 'day start') or now >= day_end
    or now < int_arg(ARGV[4], 'month start') or now >= month_end then
  return {STALE_WINDOW, now}
end
local n = #ARGV - 7
if #KEYS ~= 2 + 2 * n then error('qg: check needs two counter keys per meter') end

local user = redis.call('HMGET', KEYS[1], 'loaded', 'plan', 'exp', 'ps', 'pv', 'hx')
if not user[1] then return {NOT_LOADED, 'user'} end
-- Holds past their expiry no longer count (read-only here: a write expires them).
local due = {}
if user[6] and now >= tonumber(user[6]) then
  local all = redis.call('HGETALL', KEYS[1] .. ':h')
  for i = 2, #all, 2 do
    local r = hold_record(all[i])
    if tonumber(r[3]) <= now then due[r[1]] = (due[r[1]] or 0) + tonumber(r[2]) end
  end
end
local code, status, assigned, exp = plan_in_force(user[2], user[3], now, ARGV[6])
local plan_meters = redis.call('HGET', KEYS[2], code)
if not plan_meters then return {NOT_LOADED, 'catalog'} end
if ARGV[7] == '1' then
  local asked = {}
  for i = 1, n do asked[ARGV[7 + i]] = true end
  for meter in string.gmatch(plan_meters, '[^,]+') do
    if not asked[meter] then return {NEED_METERS, plan_meters} end
  end
end

local reply = {OK, code, status, assigned, exp, n}
for i = 1, n do
  local meter = ARGV[7 + i]
  local period, limit, since = meter_rule(KEYS[2], code, meter)
  local used, period_end
  local cycle_key
  if period == 'c' then
    local kind
    kind, cycle_key = cycle_counter(KEYS[1], meter, int_or_zero(user[4]), since, exp,
                                    int_or_zero(user[5]))
    if kind == 'm' then period = 'm' end
  end
  if cycle_key then
    used, period_end = int_or_zero(redis.call('GET', cycle_key)), exp
  elseif period == 'd' then
    used, period_end = int_or_zero(redis.call('GET', KEYS[1 + 2 * i])), day_end
  elseif period == 'm' then
    used, period_end = int_or_zero(redis.call('GET', KEYS[2 + 2 * i])), month_end
  else
    used, period_end = stored_int(redis.call('HGET', KEYS[1], 'n:' .. meter), 'usage'), 0
  end
  local held_cr = redis.call('HMGET', KEYS[1], 'cr:' .. meter, 'h:' .. meter)
  local credits = stored_int(held_cr[1], 'credits')
  local held = int_or_zero(held_cr[2]) - (due[meter] or 0)
  local allowance = limit - used
  if allowance < 0 then allowance = 0 end
  local remaining = allowance + credits - held
  if remaining < 0 then remaining = 0 end
  local row = {meter, period, limit, used, credits, remaining, period_end, held}
  for _, v in ipairs(row) do reply[#reply + 1] = v end
end
return reply
