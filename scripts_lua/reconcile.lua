-- reconcile.lua: replace a reservation's cost by the actual usage, in every scope. Uses lib.lua.
--
-- KEYS: per scope s, three keys z, c, u (see lib.lua) at 3s-2, 3s-1, 3s; one {hash tag} for all.
-- ARGV:
--   1      now in ms, or -1 for the server's TIME
--   2      reservation id
--   3..5   reserved cost: requests, input tokens, output tokens
--   6..8   actual usage: requests, input tokens, output tokens
--   9      TTL margin in ms
--   10..   per scope s at 10 + (s-1): window ms
-- Per scope, after removing expired entries: if the entry is still there, its cost becomes the
-- actual usage in place (it keeps its time); otherwise the excess max(0, actual - reserved) is
-- added as a new entry at now, so usage that outlived the window is never lost.
-- Returns integers: now ms, then per scope 1 if adjusted in place, 2 if the excess was added,
--   0 if nothing changed.

local now = clock(ARGV[1])
local id = ARGV[2]
local reserved = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local actual = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
local margin = tonumber(ARGV[9])
local n = #KEYS / 3

local out = {now}
for s = 1, n do
  local z, c, u = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
  local window = tonumber(ARGV[9 + s])
  local sums = expire(z, c, u, now - window)
  local old = redis.call('HGET', c, id)
  local outcome = 0
  if old then
    local prev = parse(old)
    for d = 1, 3 do sums[d] = sums[d] + actual[d] - prev[d] end
    redis.call('HSET', c, id, pack(actual))
    write_sums(u, sums)
    touch(z, c, u, window + margin)
    outcome = 1
  else
    local excess = {0, 0, 0}
    for d = 1, 3 do
      if actual[d] > reserved[d] then excess[d] = actual[d] - reserved[d] end
    end
    if excess[1] > 0 or excess[2] > 0 or excess[3] > 0 then
      for d = 1, 3 do sums[d] = sums[d] + excess[d] end
      redis.call('ZADD', z, now, id)
      redis.call('HSET', c, id, pack(excess))
      write_sums(u, sums)
      touch(z, c, u, window + margin)
      outcome = 2
    end
  end
  out[#out + 1] = outcome
end
return out
