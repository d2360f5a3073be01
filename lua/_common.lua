-- _common.lua: helpers prepended to every operation script when it is registered.
-- It defines functions and constants only; it never touches a key by itself.
--
-- Reply status codes (mirrored by lua.Status in Python):
local OK, DUPLICATE, REF_REUSED, INSUFFICIENT, NOT_LOADED, STALE_WINDOW, BACKLOG,
  NEED_METERS = 1, 2, 3, 4, 5, 6, 7, 9

-- Integers travel as decimal strings; Lua numbers are doubles, exact below 2^53.
local EXACT = 9007199254740992

local function int_arg(value, name)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < 0 or n >= EXACT then
    error('qg: ' .. name .. ' is not a non-negative integer: ' .. tostring(value))
  end
  return n
end

-- An exact integer as text ('..' would format large numbers as 1e+15). '%d' formats a C
-- long, 64 bits on every platform Redis ships for (exact: |n| < 2^53 here), and costs a
-- fraction of '%.0f', which goes through floating-point printing.
local function istr(n)
  return string.format('%d', n)
end

local function int_or_zero(value)
  if not value then return 0 end
  return tonumber(value)
end

-- A stored running sum (credits, usage) as a number. PostgreSQL caps every such sum far
-- below 2^53 (MAX_BALANCE_MICRO); one at or past it would not be exact here: refuse it.
local function stored_int(value, name)
  if not value then return 0 end
  local n = tonumber(value)
  if n >= EXACT then error('qg: ' .. name .. ' is past 2^53: ' .. value) end
  return n
end

-- "Now" in milliseconds: the caller's pinned time (tests, simulations) or Redis TIME.
local function clock(override)
  local pinned = int_arg(override, 'now')
  if pinned > 0 then return pinned end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The plan in force: the assigned one, or the default once the assigned one expired.
-- Returns code, status ('active'|'expired'), assigned code, expiry ms (0 = none).
local function plan_in_force(user_fields_plan, user_fields_exp, now, default_code)
  local assigned = user_fields_plan or default_code
  local exp = int_or_zero(user_fields_exp)
  if exp > 0 and now >= exp then
    return default_code, 'expired', assigned, exp
  end
  return assigned, 'active', assigned, exp
end

-- A catalog rule's text ('<period>:<allowance>', or 'c:<allowance>:<since ms>' for a cycle,
-- see load_catalog.lua; or false) as period ('d', 'm', 'c' or 'n'), allowance in
-- micro-units and, for a cycle, when the meter became one. A meter the plan does not name
-- has no allowance (credits can still pay for it).
local function parse_rule(text)
  if not text then return 'n', 0, 0 end
  local period = string.sub(text, 1, 1)
  if period == 'c' then
    local limit, since = string.match(text, '^c:(%d+):(%d+)$')
    return 'c', tonumber(limit), tonumber(since)
  end
  return period, tonumber(string.sub(text, 3)), 0
end

-- Where a 'cycle' meter counts for a user: its assignment's own counter (key
-- <user>:c:<meter>:y:<plan version>: every purchase, renewal or plan apply is a new version,
-- so a new cycle; in the user's hash slot), ending at the plan's expiry; or, for an
-- assignment that began before the meter became a cycle (or whose start Redis does not
-- hold, or that has no expiry to end a cycle), the calendar month, as before the switch.
-- Returns the period kind to count in ('y' or 'm') and, for 'y', the key and cycle id.
local function cycle_counter(user_key, meter, start, since, expires, version)
  if start > 0 and start >= since and expires > 0 and version > 0 then
    return 'y', user_key .. ':c:' .. meter .. ':y:' .. istr(version), version
  end
  return 'm'
end

-- A meter's rule in a plan, read from a shard's catalog copy (see parse_rule).
local function meter_rule(plans_key, code, meter)
  return parse_rule(redis.call('HGET', plans_key, code .. '|' .. meter))
end
