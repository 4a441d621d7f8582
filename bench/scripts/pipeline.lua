-- wrk script: send DEPTH requests back to back on each connection before reading
-- (HTTP/1.1 pipelining, the TechEmpower "plaintext" shape).
-- Usage: wrk -t1 -cCONNECTIONS ... -s pipeline.lua URL -- DEPTH CONNECTIONS
--
-- wrk records one latency per batch: from writing the batch to reading its last
-- response. Its printed percentiles are wrong for a pipelined batch: after the run wrk
-- adds samples for requests it believes a slow response held back (its coordinated-
-- omission correction), spaced by the run's time over the RESPONSES per connection,
-- DEPTH times too few a gap for batches; most of those samples land below the lowest
-- one recorded, where its percentile walk (from that lowest one up) never counts them
-- although its total does: the high percentiles run off the end and print 0.
-- done() below reads the histogram wrk recorded, takes its correction off again
-- (exactly: each added sample is a recorded one moved down by whole gaps) and prints
-- the percentiles of the batches as they were measured, in a line bench/harness.py reads.
local ffi = require("ffi")

ffi.cdef [[
typedef struct { uint64_t count, limit, min, max; } wrk_stats_head;
]]

local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  depth = tonumber(args[1]) or 16
  connections = tonumber(args[2])
  local r = {}
  for i = 1, depth do
    r[i] = wrk.format(nil)
  end
  req = table.concat(r)
end

request = function()
  return req
end

-- The batches' latencies in microseconds, as wrk recorded them: {[us] = count}, their
-- number, or nil and why not.
local function recorded(summary, latency)
  local conns = threads[1] and threads[1]:get("connections")
  if #threads ~= 1 or not conns then
    return nil, "needs -t1 and the connection count as the script's second argument"
  end
  -- (the userdata holds wrk's `stats *`; the layout is wrk 4.x's stats.h, checked below)
  local head = ffi.cast("wrk_stats_head **", latency)[0]
  local lo, hi = tonumber(head.min), tonumber(head.max)
  if lo ~= latency.min or hi ~= latency.max or hi >= tonumber(head.limit) then
    return nil, "wrk's histogram is not laid out as expected"
  end
  local data = ffi.cast("uint64_t *", head) + 4
  local per_conn = math.floor(summary.requests / conns)
  local gap = per_conn > 0 and math.floor(summary.duration / per_conn) or nil
  local counts, n = {}, 0
  for us = lo, hi do
    local c = tonumber(data[us])
    if gap and us > gap and us + gap <= hi then
      c = c - tonumber(data[us + gap])  -- (the samples added here from one gap higher)
    end
    if c < 0 then
      return nil, "wrk's correction did not come off cleanly"
    end
    if c > 0 then
      counts[us] = c
      n = n + c
    end
  end
  -- whole batches, and at most one cut short by the end of the run per connection: a
  -- connection count other than wrk's -c gives a count outside these bounds
  local depth = threads[1]:get("depth")
  local rest = summary.requests - depth * (n + summary.errors.timeout)
  if rest < 0 or rest >= depth * conns then
    return nil, "the batches do not add up to wrk's requests: is the connection count -c?"
  end
  return counts, n, lo, hi
end

done = function(summary, latency, requests)
  local counts, n, lo, hi = recorded(summary, latency)
  if not counts then
    io.write("pipelined batches: none measured (", n, ")\n")
    return
  end
  if n == 0 then
    io.write("pipelined batches: none completed\n")
    return
  end
  local want = { 50, 99 }
  local at, seen, k = {}, 0, 1
  for us = lo, hi do
    seen = seen + (counts[us] or 0)
    while k <= #want and seen >= math.ceil(want[k] / 100 * n) do
      at[k] = us
      k = k + 1
    end
  end
  io.write(string.format("pipelined batches: %d of %d requests each, p50 %.3fms p99 %.3fms\n",
                         n, threads[1]:get("depth"), at[1] / 1000, at[2] / 1000))
end
