-- _debit.lua: the debit logic, one copy, included (after _common.lua) by debit.lua (one
-- debit per call) and debit_many.lua (a batch of debits per call).
--
-- A context holds what one script call shares between its debits: "now", the period
-- windows, the deployment's constants, and read caches that stay exact within one script
-- call (a script runs atomically, and nothing here writes what they cache):
--   * the shard streams' lengths: read once, then counted up by every XADD;
--   * the catalog lookups (plan present, meter rule): debits never write the catalog,
--     and every shard holds a copy of the same catalog (sync_catalog), so a lookup made
--     in one shard's copy serves the debits of every shard in the call;
--   * the user hashes whose TTL must be refreshed, once per call at the end (HINCRBY
--     keeps a TTL, and "now" does not move inside a script); a hash is refreshed only
--     when less than half of its TTL is left (field 'xt', see debit_one).

-- h: now (0 = Redis TIME), day id, day start, day end, month id, month start, month end,
-- idempotency TTL ms, counter grace ms, user TTL ms, backlog limit, default plan code.
local function debit_context(h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12)
  local ctx = {
    now = clock(h1),
    day_id = h2, day_start = int_arg(h3, 'day start'), day_end = int_arg(h4, 'day end'),
    month_id = h5, month_start = int_arg(h6, 'month start'),
    month_end = int_arg(h7, 'month end'),
    idem_ttl = int_arg(h8, 'idempotency ttl'), grace = int_arg(h9, 'grace'),
    user_ttl = int_arg(h10, 'user ttl'), backlog_limit = int_arg(h11, 'backlog limit'),
    default_plan = h12,
    xlen = {}, rules = {}, touched = {}, n_touched = 0,
  }
  local now = ctx.now
  -- Number-to-text conversions (string.format, and redis.call's own for a number
  -- argument) are among the dearest steps of a debit: the texts every debit of the call
  -- shares are made once here, or are the arguments' own.
  ctx.now_s, ctx.day_pid, ctx.month_pid = istr(now), 'd:' .. h2, 'm:' .. h5
  ctx.idem_ttl_s = h8
  ctx.stale = now < ctx.day_start or now >= ctx.day_end or now < ctx.month_start
    or now >= ctx.month_end
  return ctx
end

-- One debit: take `amount` of one meter from the user's period allowance first, then from
-- credits; all or nothing, at most once per (user, ref), with its ledger event.
-- Keys: user hash, idempotency key, shard catalog, day counter, month counter, shard stream.
-- Returns the reply table (see debit.lua).
local function debit_one(ctx, k_user, k_ref, k_plans, k_day, k_month, k_ledger,
                         user_id, meter, amount_arg, ref, fp, reason, caller, tx, action)
  -- Canonical digits, so that the text itself can go into the ledger event unconverted.
  if not string.find(amount_arg, '^[1-9]%d*$') then
    error('qg: amount must be a positive integer: ' .. tostring(amount_arg))
  end
  local amount = tonumber(amount_arg)
  if amount >= EXACT then error('qg: amount too large: ' .. amount_arg) end
  local now = ctx.now
  if ctx.stale then return {STALE_WINDOW, now} end

  -- A retry answers what the first attempt answered, whatever happened since.
  local prior = redis.call('GET', k_ref)
  if prior then
    local pfp, ptx, remaining = string.match(prior, '^(.-)\n(.-)\n(.*)$')
    if pfp ~= fp then return {REF_REUSED} end
    return {DUPLICATE, ptx, tonumber(remaining)}
  end

  local backlog = ctx.xlen[k_ledger]
  if not backlog then
    backlog = redis.call('XLEN', k_ledger)
    ctx.xlen[k_ledger] = backlog
  end
  if backlog >= ctx.backlog_limit then return {BACKLOG, backlog} end

  local user = redis.call('HMGET', k_user, 'loaded', 'plan', 'exp', 'cr:' .. meter,
    'n:' .. meter, 'xt')
  if not user[1] then return {NOT_LOADED, 'user'} end
  local code, status = plan_in_force(user[2], user[3], now, ctx.default_plan)
  -- One read for both: the plan's presence in the catalog copy and the meter's rule
  -- ('d|<limit>' etc.), kept parsed for the rest of the call.
  local rule_key = code .. '|' .. meter
  local rule = ctx.rules[rule_key]
  if not rule then
    local plan = redis.call('HMGET', k_plans, code, rule_key)
    if not plan[1] then return {NOT_LOADED, 'catalog'} end  -- asked for again next time
    rule = {'n', 0}  -- a meter the plan does not name: credits only
    if plan[2] then rule = {string.sub(plan[2], 1, 1), tonumber(string.sub(plan[2], 3))} end
    ctx.rules[rule_key] = rule
  end
  local period, limit = rule[1], rule[2]

  local counter, period_id, period_end = nil, 'n', 0
  local used
  if period == 'd' or period == 'm' then
    if period == 'd' then
      counter, period_id, period_end = k_day, ctx.day_pid, ctx.day_end
    else
      counter, period_id, period_end = k_month, ctx.month_pid, ctx.month_end
    end
    -- Optimistic: add the whole amount now (one call instead of GET then INCRBY), and give
    -- back below what the debit does not take from the allowance. A script runs atomically:
    -- nobody sees the counter in between.
    used = redis.call('INCRBY', counter, amount_arg) - amount
  else
    used = int_or_zero(user[5])
  end
  local credits = int_or_zero(user[4])
  local allowance = limit - used
  if allowance < 0 then allowance = 0 end  -- the limit was lowered below the usage
  local from_allowance = math.min(amount, allowance)
  local from_credits = amount - from_allowance
  local fits = from_credits <= credits
  if counter then
    if not fits or from_allowance == 0 then
      -- Nothing from the allowance: undo. A counter this call created goes (a missing
      -- counter of a loaded user is zero usage); no counter is ever left without a TTL.
      if used == 0 then
        redis.call('DEL', counter)
      else
        redis.call('DECRBY', counter, amount_arg)
      end
    else
      if from_credits > 0 then redis.call('DECRBY', counter, from_credits) end
      -- A counter that did not exist gets its expiry now; one that existed already has it.
      -- Relative to the script's clock, so that a pinned clock (tests) and Redis agree.
      if used == 0 then redis.call('PEXPIRE', counter, period_end + ctx.grace - ctx.now) end
    end
  end
  if not fits then
    return {INSUFFICIENT, allowance + credits, limit, period, period_end, code, status}
  end

  -- Every check passed: from here on only writes, which cannot fail half-way on valid keys.
  if from_allowance > 0 and not counter then
    redis.call('HINCRBY', k_user, 'n:' .. meter, from_allowance)
  end
  if from_credits > 0 then
    redis.call('HINCRBY', k_user, 'cr:' .. meter, -from_credits)
  end
  local remaining = allowance + credits - amount
  local remaining_s = istr(remaining)
  redis.call('SET', k_ref, fp .. '\n' .. tx .. '\n' .. remaining_s, 'PX', ctx.idem_ttl_s)
  -- One field, values joined by the unit separator (ids, refs and reasons cannot contain
  -- control characters): a fraction of the cost and memory of one field per value.
  -- Layout (reconciler/events.py): v1 kind tx user meter amount from_allowance from_credits
  -- period ref reason caller action plan ts remaining. The amounts are texts made without
  -- string.format where they can be: the amount's own digits, '0'. The remaining amount
  -- goes to the ledger so that the idempotency key can be restored from it (load_user).
  local fa_s, fc_s = amount_arg, '0'
  if from_credits > 0 then fa_s, fc_s = istr(from_allowance), istr(from_credits) end
  redis.call('XADD', k_ledger, '*', 'e', table.concat({
    'v1', 'debit', tx, user_id, meter, '-' .. amount_arg, fa_s, fc_s, period_id, ref, reason,
    caller, action, code, ctx.now_s, remaining_s}, '\031'))
  ctx.xlen[k_ledger] = backlog + 1
  -- The user hash's TTL is pushed back when less than half of it is left (not on every
  -- debit): 'xt' holds the expiry this script last set. Other scripts only ever set the
  -- full TTL, so 'xt' never promises more time than the hash has.
  if not ctx.touched[k_user] and now + ctx.user_ttl - int_or_zero(user[6]) > ctx.user_ttl / 2
  then
    ctx.touched[k_user] = true
    ctx.n_touched = ctx.n_touched + 1
    ctx.touched[ctx.n_touched] = k_user
  end
  -- The caller knows the tx id and the amount (from_allowance = amount - from_credits):
  -- each element less is Redis work less per debit.
  return {OK, remaining, from_credits, code}
end

-- After the call's debits: refresh the TTL of the user hashes a debit found past half of
-- it (idle users fall out of Redis and are reloaded from PostgreSQL).
local function debit_finish(ctx)
  local expires = istr(ctx.now + ctx.user_ttl)
  for i = 1, ctx.n_touched do
    redis.call('PEXPIRE', ctx.touched[i], ctx.user_ttl)
    redis.call('HSET', ctx.touched[i], 'xt', expires)
  end
end
