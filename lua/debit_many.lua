-- debit_many.lua: a batch of debits in one call (the hot path sends the debits a worker
-- issues while its previous call is in flight as one call: lua/connection.py). A debit
-- takes `amount` of one meter from the user's period allowance first, then from credits,
-- never what the user's open holds of the meter keep (their due ones expire first);
-- all or nothing, at most once per (user, ref), with its ledger event. The debits run one
-- after the other (the same ref twice: the second is a DUPLICATE or a REF_REUSED); each
-- is atomic, and so is the batch as a whole.
--
-- n = #KEYS / 6 debits (the caller keeps n small: at most 32).
-- KEYS[6i-5]  user state hash           <prefix>:{shard}:u:<user>
-- KEYS[6i-4]  the user's ref buckets    <prefix>:{shard}:u:<user>:r (buckets ':<n>' of it,
--             in the same hash slot: _common.lua, ref_find)
-- KEYS[6i-3]  shard plan catalog hash   <prefix>:{shard}:plans
-- KEYS[6i-2]  day counter of the meter  <prefix>:{shard}:u:<user>:c:<meter>:d:<YYYY-MM-DD>
-- KEYS[6i-1]  month counter             <prefix>:{shard}:u:<user>:c:<meter>:m:<YYYY-MM>
--             (a 'cycle' meter counts in <user key>:c:<meter>:y:<plan version>,
--             built here from KEYS[6i-5]: the same hash slot; _common.lua, cycle_counter)
-- KEYS[6i]    shard ledger stream       <prefix>:{shard}:ledger
--             (debits of different shards may share a call on a single Redis; Redis
--             Cluster would need one call per hash slot)
-- ARGV[1]   now, ms since epoch; 0 = use Redis TIME (read once for the whole call)
-- ARGV[2]   day period id     ARGV[3] day start ms     ARGV[4] day end ms
-- ARGV[5]   month period id   ARGV[6] month end ms (a day lies within its month, so the
--           day's bounds alone tell whether the windows are stale)
-- ARGV[7]   idempotency TTL, ms (how long a ref is remembered, at least)
-- ARGV[8]   grace kept after a period's end before its counter expires, ms
-- ARGV[9]   user state TTL, ms (idle users fall out of Redis and are reloaded)
-- ARGV[10]  backlog limit: refuse when the shard stream holds this many entries
-- ARGV[11]  default plan code
-- ARGV[12+4(i-1) .. 15+4(i-1)]  debit i:
--   meter
--   amount, micro-units: an integer > 0 in canonical digits (they go into the event as is)
--   the idempotency record: its field (12 bytes), then its head: fingerprint (4 bytes, of
--     meter, amount and reason: the same ref with another one is reuse) and the tx id's
--     record id (8 bytes; core/refs.py)
--   head of the ledger event: 'v2', 'debit', tx, user, meter, '-' amount, ref, reason,
--     caller, action, joined by '\031' (reconciler/events.py, LAYOUT_V2); the script
--     appends from_allowance, from_credits, period, plan code, time and remaining
--
-- Reply: one flat array; per debit, the number of values of its reply, then the values
-- (status first), or 1 and an error reply when the debit raised one (a bad argument, a
-- wrong key type; the other debits still run):
--   OK, remaining, from_credits, plan_code   (the caller knows the tx id and the amount;
--                                             from the allowance: amount - from_credits)
--   DUPLICATE, tx record id, remaining       the ref was already debited: nothing changed
--   REF_REUSED                               the ref was used for another meter/amount/reason
--   INSUFFICIENT, remaining, limit, period, period_end_ms, plan_code, plan_status
--   NOT_LOADED, 'user'|'catalog'             load from PostgreSQL and call again
--   STALE_WINDOW, now                        the period windows do not contain now
--   BACKLOG, entries                         the unflushed ledger is over its limit
-- A flat array costs Redis a fraction of a table per debit to turn into its reply.
local HEADER, PER_DEBIT = 11, 4
local n = #KEYS / 6
if n < 1 or n ~= math.floor(n) or #ARGV ~= HEADER + PER_DEBIT * n then
  error('qg: debit_many needs six keys and four arguments per debit')
end

-- What the call's debits share: "now", the windows and constants (the ones that need a
-- number parsed when first used: number parsing is among the dearest steps), and read
-- caches that stay exact within one call (a script runs atomically, and nothing here
-- writes what they cache):
--   * the shard streams' lengths: read once, then counted up by every XADD;
--   * the catalog lookups (plan present, meter rule) by plan and meter: debits never write
--     the catalog, and every shard holds a copy of the same catalog (sync_catalog), so a
--     lookup made in one shard's copy serves the debits of every shard in the call;
--   * the user hash fields of each meter;
--   * the user hashes whose TTL must be refreshed, once at the end (HINCRBY keeps a TTL,
--     and "now" does not move inside a script).
local now = clock(ARGV[1])
local day_start, day_end = int_arg(ARGV[3], 'day start'), int_arg(ARGV[4], 'day end')
local stale = now < day_start or now >= day_end
local user_ttl = int_arg(ARGV[9], 'user ttl')
local backlog_limit = int_arg(ARGV[10], 'backlog limit')
local default_plan, idem_ttl_s = ARGV[11], ARGV[7]
local day_pid, month_pid = 'd:' .. ARGV[2], 'm:' .. ARGV[5]
local now_s = istr(now)
local ref_w, ref_r = ref_window(ARGV[7])
local month_end, grace  -- parsed when first needed
local xlen, rules, fields, touched, n_touched = {}, {}, {}, {}, 0

-- The end of a period ('d', 'm' or 'c' ending at ``cycle_end``) in ms; the month's end and
-- the grace are parsed once.
local function period_end(period, cycle_end)
  if period == 'd' then return day_end end
  if period == 'c' then return cycle_end end
  if not month_end then month_end = int_arg(ARGV[6], 'month end') end
  return month_end
end

-- A new counter expires at its period's end plus the grace, relative to the script's
-- clock, so that a pinned clock (tests) and Redis agree.
local function counter_ttl(period, cycle_end)
  if not grace then grace = int_arg(ARGV[8], 'grace') end
  return period_end(period, cycle_end) + grace - now
end

-- Give back what an INCRBY took: a counter it created goes (a missing counter of a loaded
-- user is zero usage), so no counter is ever left without a TTL.
local function undo_incr(counter, used, amount_arg)
  if used == 0 then
    redis.call('DEL', counter)
  else
    redis.call('DECRBY', counter, amount_arg)
  end
end

-- One debit (see the header). Validation comes before the first write; the exception is
-- the optimistic INCRBY, undone on a refusal before the script moves on (invisible: a
-- script runs atomically).
local function debit_one(k_user, k_ref, k_plans, k_day, k_month, k_ledger, meter, amount_arg,
                         record, event)
  if not string.find(amount_arg, '^[1-9]%d*$') then
    error('qg: amount must be a positive integer: ' .. tostring(amount_arg))
  end
  local amount = tonumber(amount_arg)
  if amount >= EXACT then error('qg: amount too large: ' .. amount_arg) end
  if stale then return {STALE_WINDOW, now} end

  local f = fields[meter]
  if not f then
    f = {'cr:' .. meter, 'n:' .. meter, 'h:' .. meter}
    fields[meter] = f
  end
  local user = redis.call('HMGET', k_user, 'loaded', 'plan', 'exp', f[1], f[2], 'xt', 'ps',
                           'pv', 'hx', f[3])
  if not user[1] then return {NOT_LOADED, 'user'} end
  -- Open holds take their units out of what a debit may take; the due ones expire first.
  if user[9] and drop_expired_holds(k_user, user[9], now, k_ledger, idem_ttl_s) > 0 then
    user[10] = redis.call('HGET', k_user, f[3])
    xlen[k_ledger] = nil  -- the expiries were appended
  end
  local held = int_or_zero(user[10])
  -- A ref already taken answers what its first debit answered, whatever the meter, the
  -- backlog or the catalog hold now (a retry of a debit that went through is a 409).
  local field, head = string.sub(record, 1, 12), string.sub(record, 13)
  local prior, k_bucket, bucket_exists, bucket = ref_find(k_ref, field, now, ref_w, ref_r)
  if prior then return prior_reply(prior, head) end

  local backlog = xlen[k_ledger]
  if not backlog then
    backlog = redis.call('XLEN', k_ledger)
    xlen[k_ledger] = backlog
  end
  if backlog >= backlog_limit then return {BACKLOG, backlog} end

  local code, status = plan_in_force(user[2], user[3], now, default_plan)
  -- One read for both: the plan's presence in the catalog copy and the meter's rule
  -- ('d|<limit>' etc.), kept parsed for the rest of the call.
  local by_meter = rules[code]
  local rule = by_meter and by_meter[meter]
  if not rule then
    local plan = redis.call('HMGET', k_plans, code, code .. '|' .. meter)
    if not plan[1] then return {NOT_LOADED, 'catalog'} end  -- asked for again next time
    rule = {parse_rule(plan[2])}  -- a meter the plan does not name: credits only
    if not by_meter then
      by_meter = {}
      rules[code] = by_meter
    end
    by_meter[meter] = rule
  end
  local period, limit = rule[1], rule[2]

  local counter, period_id = nil, 'n'
  local used
  local cycle_end  -- a cycle counter ends with the plan (its expiry)
  if period == 'c' then
    local kind, key, cycle = cycle_counter(k_user, meter, int_or_zero(user[7]), rule[3],
                                           int_or_zero(user[3]), int_or_zero(user[8]))
    if kind == 'y' then
      counter, period_id, cycle_end = key, 'y:' .. istr(cycle), int_or_zero(user[3])
    else
      period = 'm'
    end
  end
  if period == 'd' then
    counter, period_id = k_day, day_pid
  elseif period == 'm' then
    counter, period_id = k_month, month_pid
  end
  if counter then
    -- Optimistic: add the whole amount now (one call instead of GET then INCRBY), and give
    -- back below what the debit does not take from the allowance.
    used = redis.call('INCRBY', counter, amount_arg) - amount
  else
    used = stored_int(user[5], 'usage')
  end
  local credits = stored_int(user[4], 'credits')
  local allowance = limit - used
  if allowance < 0 then allowance = 0 end  -- the limit was lowered below the usage
  local from_allowance = math.min(amount, allowance)
  local from_credits = amount - from_allowance
  local counted = counter and from_allowance > 0  -- the INCRBY stays (in part)
  if counter and not counted then undo_incr(counter, used, amount_arg) end
  local free = allowance + credits - held
  if amount > free then
    if counted then undo_incr(counter, used, amount_arg) end
    local end_ms = 0
    if counter then end_ms = period_end(period, cycle_end) end
    if free < 0 then free = 0 end  -- holds may cover more than is left after a refund
    return {INSUFFICIENT, free, limit, period, end_ms, code, status}
  end

  -- It fits. From here on only writes, which cannot fail half-way on valid keys; the
  -- ref is remembered first (its bucket was read above: a wrong type failed there).
  local remaining = free - amount
  local remaining_s = istr(remaining)
  ref_take(k_bucket, bucket_exists, bucket, field, head, now, ref_w, ref_r, remaining)
  if counted then
    if from_credits > 0 then redis.call('DECRBY', counter, from_credits) end
    -- A counter that did not exist gets its expiry now; one that existed already has it.
    if used == 0 then redis.call('PEXPIRE', counter, counter_ttl(period, cycle_end)) end
  elseif from_allowance > 0 then
    redis.call('HINCRBY', k_user, f[2], from_allowance)
  end
  if from_credits > 0 then
    redis.call('HINCRBY', k_user, f[1], -from_credits)
  end
  -- One field, the head the caller made and what the script decided, joined by the unit
  -- separator in one concatenation; the amounts are the argument's own digits where they
  -- can be (no number formatting).
  local fa_s, fc_s = amount_arg, '0'
  if from_credits > 0 then fa_s, fc_s = istr(from_allowance), istr(from_credits) end
  redis.call('XADD', k_ledger, '*', 'e', event .. '\031' .. fa_s .. '\031' .. fc_s .. '\031'
    .. period_id .. '\031' .. code .. '\031' .. now_s .. '\031' .. remaining_s)
  xlen[k_ledger] = backlog + 1
  -- The user hash's TTL is pushed back when less than half of it is left (not on every
  -- debit): 'xt' holds the expiry this script last set. Other scripts only ever set the
  -- full TTL, so 'xt' never promises more time than the hash has.
  if not touched[k_user] and now + user_ttl - int_or_zero(user[6]) > user_ttl / 2 then
    touched[k_user] = true
    n_touched = n_touched + 1
    touched[n_touched] = k_user
  end
  return {OK, remaining, from_credits, code}
end

local out, o = {}, 0
for i = 1, n do
  local k, a = 6 * (i - 1), HEADER + PER_DEBIT * (i - 1)
  o = batch_append(out, o, pcall(debit_one, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
    KEYS[k + 4], KEYS[k + 5], KEYS[k + 6], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]))
end

-- Refresh the TTL of the user hashes a debit found past half of it.
local expires = istr(now + user_ttl)
for i = 1, n_touched do
  redis.call('PEXPIRE', touched[i], user_ttl)
  redis.call('HSET', touched[i], 'xt', expires)
end
return out
