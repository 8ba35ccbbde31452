-- wrk script for bench/run.py: POST hook requests, each one fresh.
--
--   wrk -t <threads> ... -s bench/hook.lua <url> -- <body template> <path> <tokens file or -> <threads> <rate> <tag>
--
-- The body template (written by run.py) holds the placeholder "@@@@@@@@@@@@" (12 characters) wherever a
-- request must differ from the last: in its hookInstance (a UUID whose last 12 hex digits it fills) and after
-- every draft order's id and the selections naming it. Each request fills it with 12 hex digits unique in
-- this run (the thread in the first digit, a counter after it), and <tag> (6 hex digits, per wrk run) is in
-- the template already, so no two requests of a benchmark carry the same hookInstance or order ids.
--
-- With a tokens file (one JWT per line), every request carries its own token as "Authorization: Bearer
-- <jwt>": each of the <threads> wrk threads takes every n-th line, so no token is sent twice (a replayed jti
-- is refused). If the tokens run out they are reused, and the replays show up as non-2xx responses.
--
-- <rate> > 0: open loop. Each thread sends on its own schedule, <rate> requests per second, one every
-- 1000/<rate> ms, on whichever of its connections is free (wrk's delay() hook). A request that could not start
-- on time because every connection was busy is a "late start"; done() counts them and the worst lateness, so a
-- run whose generator fell behind is seen for what it is (its latencies are then understated).
-- <rate> = 0: closed loop, as fast as the connections allow.
--
-- done() prints one line "BENCH {json}" that run.py reads.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local PLACEHOLDER = "@@@@@@@@@@@@"
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

-- The request split around its placeholders: pieces[1] kind[1] pieces[2] kind[2] ... pieces[n+1]
local function split(template)
  local pieces, kinds = {}, {}
  local pos = 1
  while true do
    local a = string.find(template, PLACEHOLDER, pos, true)
    local b = string.find(template, "@@TOKEN@@", pos, true)
    local at, kind, len
    if a and (not b or a < b) then
      at, kind, len = a, "n", #PLACEHOLDER
    elseif b then
      at, kind, len = b, "t", 9
    else
      break
    end
    table.insert(pieces, string.sub(template, pos, at - 1))
    table.insert(kinds, kind)
    pos = at + len
  end
  table.insert(pieces, string.sub(template, pos))
  return pieces, kinds
end

function init(args)
  non2xx = 0
  late = 0
  late_max_ms = 0
  local body = slurp(args[1])
  local path = args[2]
  local nthreads = tonumber(args[4])
  local rate = tonumber(args[5])
  local headers = {["Content-Type"] = "application/json"}
  local tokens, n = {}, 0
  if args[3] ~= "-" then
    headers["Authorization"] = "Bearer @@TOKEN@@"
    local line_no = 0
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
  end
  local pieces, kinds = split(wrk.format("POST", path, headers, body))
  local parts = {}
  local count, ti = 0, 0
  request = function()
    count = count + 1
    local fresh = string.format("%x%011x", id, count)
    local token
    if n > 0 then
      ti = ti + 1
      if ti > n then ti = 1 end
      token = tokens[ti]
    end
    for k = 1, #kinds do
      parts[2 * k - 1] = pieces[k]
      parts[2 * k] = kinds[k] == "n" and fresh or token
    end
    parts[2 * #kinds + 1] = pieces[#kinds + 1]
    return table.concat(parts, "", 1, 2 * #kinds + 1)
  end
  if rate > 0 then
    local interval = 1000 / rate
    local next_slot = nil
    delay = function()
      local t = now_ms()
      if next_slot == nil then next_slot = t end
      local slot = next_slot
      next_slot = next_slot + interval
      local d = slot - t
      if d < -1 then -- every connection was busy past this request's slot
        late = late + 1
        if -d > late_max_ms then late_max_ms = -d end
      end
      if d <= 0 then return 0 end
      return math.floor(d)
    end
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local bad, nlate, worst = 0, 0, 0
  for _, thread in ipairs(threads) do
    bad = bad + thread:get("non2xx")
    nlate = nlate + thread:get("late")
    local w = thread:get("late_max_ms")
    if w > worst then worst = w end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"late": %d, "late_max_ms": %.1f}\n',
    summary.requests, summary.duration, bad, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, nlate, worst))
end
