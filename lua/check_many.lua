-- check_many.lua: read-only views of users' plans and what remains of some meters; the
-- checks a worker issues while its previous call is in flight go out as one call
-- (lua/connection.py, run_batched), as debits do.
--
-- n = #KEYS / 2 checks.
-- KEYS[2i-1]  user state hash           <prefix>:{shard}:u:<user>
-- KEYS[2i]    shard plan catalog hash   <prefix>:{shard}:plans
--             (the meters' counters are built from KEYS[2i-1]: the same hash slot)
-- ARGV[1]  now, ms since epoch; 0 = use Redis TIME (read once for the whole call)
-- ARGV[2]  day period id     ARGV[3] day start ms     ARGV[4] day end ms
-- ARGV[5]  month period id   ARGV[6] month start ms   ARGV[7] month end ms
-- ARGV[8]  default plan code
-- ARGV[9 + 2(i-1)]   check i: '1' to answer every meter of the plan too (after the ones
--                    asked, those the plan names that were not asked, in the plan's order)
-- ARGV[10 + 2(i-1)]  check i: the meters asked for, joined by ','
--
-- Reply: one flat array; per check, the number of values of its reply, then the values
-- (or 1 and an error reply):
--   OK, plan_code, plan_status, assigned_code, expires_ms, n,
--     then n times: meter, period, limit, used, credits, remaining, period_end_ms, held
--   (period 'c', a cycle: counted from the assignment's start, ending at its expiry; a
--   cycle meter of an assignment older than the cycle rule counts by month: 'm'; held:
--   units kept by open holds, not counting the ones past their expiry, which the next
--   script that writes expires; remaining is what is left after them)
--   NOT_LOADED, 'user'|'catalog'
--   STALE_WINDOW, now
local HEADER = 8
local n = #KEYS / 2
if n < 1 or n ~= math.floor(n) or #ARGV ~= HEADER + 2 * n then
  error('qg: check_many needs two keys and two arguments per check')
end
local now = clock(ARGV[1])
local day_end, month_end = int_arg(ARGV[4], 'day end'), int_arg(ARGV[7], 'month end')
local stale = now < int_arg(ARGV[3], 'day start') or now >= day_end
    or now < int_arg(ARGV[6], 'month start') or now >= month_end
local day_suffix, month_suffix = ':d:' .. ARGV[2], ':m:' .. ARGV[5]
local default_plan = ARGV[8]

local function check_one(k_user, k_plans, every, asked)
  if stale then return {STALE_WINDOW, now} end
  local meters = {}
  for meter in string.gmatch(asked, '[^,]+') do meters[#meters + 1] = meter end
  local n = #meters
  local user = redis.call('HMGET', k_user, 'loaded', 'plan', 'exp', 'ps', 'pv', 'hx')
  if not user[1] then return {NOT_LOADED, 'user'} end
  -- Holds past their expiry no longer count (read-only here: a write expires them).
  local due = {}
  if user[6] and now >= tonumber(user[6]) then
    local all = redis.call('HGETALL', k_user .. ':h')
    for i = 2, #all, 2 do
      local r = hold_record(all[i])
      if tonumber(r[3]) <= now then due[r[1]] = (due[r[1]] or 0) + tonumber(r[2]) end
    end
  end
  local code, status, assigned, exp = plan_in_force(user[2], user[3], now, default_plan)
  local plan_meters = redis.call('HGET', k_plans, code)
  if not plan_meters then return {NOT_LOADED, 'catalog'} end
  if every == '1' then
    local wanted = {}
    for i = 1, n do wanted[meters[i]] = true end
    for meter in string.gmatch(plan_meters, '[^,]+') do
      if not wanted[meter] then
        wanted[meter] = true
        meters[#meters + 1] = meter
      end
    end
    n = #meters
  end

  -- Three reads for all the meters (a call into Redis costs more than the values it
  -- returns): the rules from the catalog copy, the user's fields, then the counters that
  -- the rules name.
  local rule_fields, user_fields = {}, {}
  for i = 1, n do
    local meter = meters[i]
    rule_fields[i] = code .. '|' .. meter
    user_fields[3 * i - 2], user_fields[3 * i - 1], user_fields[3 * i] =
      'cr:' .. meter, 'h:' .. meter, 'n:' .. meter
  end
  local reply = {OK, code, status, assigned, exp, n}
  if n == 0 then return reply end
  local rules = redis.call('HMGET', k_plans, unpack(rule_fields))
  local fields = redis.call('HMGET', k_user, unpack(user_fields))
  local places, counters = {}, {}
  for i = 1, n do
    local period, limit, since = parse_rule(rules[i])
    local key, period_end = false, 0
    if period == 'c' then
      local kind, cycle_key = cycle_counter(k_user, meters[i], int_or_zero(user[4]), since,
                                            exp, int_or_zero(user[5]))
      if kind == 'y' then key, period_end = cycle_key, exp else period = 'm' end
    end
    if period == 'd' then
      key, period_end = k_user .. ':c:' .. meters[i] .. day_suffix, day_end
    elseif period == 'm' and not key then
      key, period_end = k_user .. ':c:' .. meters[i] .. month_suffix, month_end
    end
    if key then counters[#counters + 1] = key end
    places[i] = {period, limit, key and #counters, period_end}
  end
  local counted = {}
  if #counters > 0 then counted = redis.call('MGET', unpack(counters)) end

  for i = 1, n do
    local meter = meters[i]
    local period, limit, at, period_end = places[i][1], places[i][2], places[i][3], places[i][4]
    local used
    if at then
      used = int_or_zero(counted[at])
    else
      used = stored_int(fields[3 * i], 'usage')
    end
    local credits = stored_int(fields[3 * i - 2], 'credits')
    local held = int_or_zero(fields[3 * i - 1]) - (due[meter] or 0)
    local allowance = limit - used
    if allowance < 0 then allowance = 0 end
    local remaining = allowance + credits - held
    if remaining < 0 then remaining = 0 end
    local row = {meter, period, limit, used, credits, remaining, period_end, held}
    for _, v in ipairs(row) do reply[#reply + 1] = v end
  end
  return reply
end

local out, o = {}, 0
for i = 1, n do
  o = batch_append(out, o, pcall(check_one, KEYS[2 * i - 1], KEYS[2 * i],
                                 ARGV[HEADER + 2 * i - 1], ARGV[HEADER + 2 * i]))
end
return out
