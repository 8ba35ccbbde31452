-- wrk script for bench/run.py: POST one hook request body again and again.
--
--   wrk -t <threads> ... -s bench/hook.lua <url> -- <body file> <path> [<tokens file> <threads>]
--
-- With a tokens file (one JWT per line), every request carries its own token as
-- "Authorization: Bearer <jwt>": each of the <threads> wrk threads takes every n-th line, so no token is
-- sent twice (a replayed jti is refused). If the tokens run out they are reused, and the
-- replays show up as non-2xx responses.
-- done() prints one line "BENCH {json}" that run.py reads.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

local function slurp(name)
  local f = assert(io.open(name, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  non2xx = 0
  local body = slurp(args[1])
  local path = args[2]
  local headers = {["Content-Type"] = "application/json"}
  if args[3] then
    local nthreads = tonumber(args[4])
    -- Build the request once around a placeholder; each call only splices in the next token.
    headers["Authorization"] = "Bearer @@TOKEN@@"
    local template = wrk.format("POST", path, headers, body)
    local at = string.find(template, "@@TOKEN@@", 1, true)
    local head, tail = string.sub(template, 1, at - 1), string.sub(template, at + 9)
    local tokens, n, line_no = {}, 0, 0
    for line in io.lines(args[3]) do
      if line ~= "" then
        if line_no % nthreads == id then
          n = n + 1
          tokens[n] = line
        end
        line_no = line_no + 1
      end
    end
    assert(n > 0, "no tokens for thread " .. id)
    local i = 0
    request = function()
      i = i + 1
      if i > n then i = 1 end
      return head .. tokens[i] .. tail
    end
  else
    local req = wrk.format("POST", path, headers, body)
    request = function() return req end
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
