-- wrk_common.lua: what bench/debit.lua and bench/check.lua share, loaded by each with
-- dofile from its own directory: the paced runs' think time and the one-line summary.

-- An exponentially distributed think time of mean `think` ms (wrk's timer resolution is
-- 1 ms), for delay().
function think_time(think)
  local u = math.random()
  if u < 1e-9 then u = 1e-9 end
  return math.floor(-math.log(u) * think + 0.5)
end

-- wrk's done(): the summary as one line "WRKJSON {...}" for the driver (bench/run.py).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
