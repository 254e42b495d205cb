-- wrk script for bench/api: cycles through the request paths listed in a file (one a
-- line, passed after `--`), each a different filtered query; requests are formatted once
-- in init(). done() prints the summary as one JSON line (prefix WRKJSON).

local requests = {}
local n = 0

function init(args)
  local file = assert(io.open(args[1], "r"))
  for path in file:lines() do
    if path ~= "" then
      requests[#requests + 1] = wrk.format(nil, path)
    end
  end
  file:close()
  assert(#requests > 0, "no paths in " .. args[1])
end

function request()
  n = n % #requests + 1
  return requests[n]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
