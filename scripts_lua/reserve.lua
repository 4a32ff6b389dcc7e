-- reserve.lua: admit one cost into every scope, or into none. Uses lib.lua.
--
-- KEYS: per scope s, three keys z, c, u (see lib.lua) at 3s-2, 3s-1, 3s; one {hash tag} for all.
-- ARGV:
--   1     now in ms, or -1 for the server's TIME (one clock for every client)
--   2     reservation id
--   3..5  cost: requests, input tokens, output tokens
--   6     TTL margin in ms: every key lives window + margin after its scope's last write
--   7..   per scope s from 7 + 4(s-1): window ms, limit requests, input, output (-1 = unlimited)
-- Expired entries (ts <= now - window) are removed first. Admitted iff, for every scope and
-- dimension with a limit, used + cost <= limit; then the entry (now, cost) goes into every scope.
-- Returns integers: admitted (1|0), now ms, retry_after ms (0 if admitted, else >= 1),
--   blocked scope (0-based, or -1), blocked dimension (0 requests, 1 input, 2 output, or -1),
--   then per scope: used requests, input, output (with the new entry if admitted), reset ms.

-- ms until the oldest entries holding at least `need` units of dimension d have left.
local function wait_ms(z, c, d, need, now, window)
  local freed, start = 0, 0
  while true do
    local page = redis.call('ZRANGE', z, start, start + CHUNK - 1, 'WITHSCORES')
    if #page == 0 then return window end -- only if the sums are off; wait a whole window
    local ids = {}
    for k = 1, #page, 2 do ids[#ids + 1] = page[k] end
    local costs = redis.call('HMGET', c, unpack(ids))
    for k = 1, #ids do
      if costs[k] then
        freed = freed + parse(costs[k])[d]
        if freed >= need then return tonumber(page[2 * k]) + window - now end
      end
    end
    start = start + CHUNK
  end
end

local now = clock(ARGV[1])
local id = ARGV[2]
local cost = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local margin = tonumber(ARGV[6])
local n = #KEYS / 3

local sums, windows = {}, {}
local retry, blocked_scope, blocked_dim = 0, -1, -1
for s = 1, n do
  local z, c, u = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
  local a = 7 + 4 * (s - 1)
  local window = tonumber(ARGV[a])
  windows[s] = window
  local used = expire(z, c, u, now - window)
  sums[s] = used
  for d = 1, 3 do
    local limit = tonumber(ARGV[a + d])
    if limit ~= -1 then
      local over = used[d] + cost[d] - limit
      if over > 0 then
        local wait = wait_ms(z, c, d, over, now, window)
        if wait > retry or blocked_scope < 0 then
          retry, blocked_scope, blocked_dim = wait, s - 1, d - 1
        end
      end
    end
  end
end

local admitted = blocked_scope < 0
if admitted then
  local packed = pack(cost)
  for s = 1, n do
    local z, c, u = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
    local used = sums[s]
    for d = 1, 3 do used[d] = used[d] + cost[d] end
    redis.call('ZADD', z, now, id)
    redis.call('HSET', c, id, packed)
    write_sums(u, used)
    touch(z, c, u, windows[s] + margin)
  end
  retry = 0
elseif retry < 1 then
  retry = 1
end

local out = {admitted and 1 or 0, now, retry, blocked_scope, blocked_dim}
for s = 1, n do
  local used = sums[s]
  out[#out + 1] = used[1]
  out[#out + 1] = used[2]
  out[#out + 1] = used[3]
  out[#out + 1] = reset_ms(KEYS[3 * s - 2], now, windows[s])
end
return out
