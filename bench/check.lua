-- wrk script: the API gateway's pre-checks, users spread round-robin (nothing is written).
--
-- wrk -t1 -c64 -d10s -s bench/check.lua http://127.0.0.1:PORT -- MODE USERS [THINK_MS]
--   MODE      billing: POST /internal/billing/check {"user_id","units":1}
--             quota:   GET /internal/billing/quota/check/bu<n>
--   USERS     users bu0 .. bu<USERS-1>
--   THINK_MS  as in debit.lua: an exponential think time per request (a paced run)
-- The summary is printed as one line "WRKJSON {...}", as debit.lua prints it.

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")

local counter, id = 0, 0
local mode, users, think = "billing", 1000, 0
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  mode = args[1] or mode
  users = tonumber(args[2] or users)
  think = tonumber(args[3] or 0)
  id = tonumber(wrk.thread:get("id")) or 0
  math.randomseed(os.time() + id * 7919)
  wrk.headers["X-Internal-Key"] = os.getenv("SERVICE_TOKEN") or "super-secret-dev"
  if mode == "billing" then
    wrk.headers["Content-Type"] = "application/json"
  end
  if think <= 0 then delay = nil end
end

function request()
  counter = counter + 1
  local user = (counter * 7 + id * 131) % users
  if mode == "billing" then
    return wrk.format("POST", "/internal/billing/check", nil,
                      string.format('{"user_id":"bu%d","units":1}', user))
  end
  return wrk.format("GET", string.format("/internal/billing/quota/check/bu%d", user))
end

function delay()
  return think_time(think)
end
