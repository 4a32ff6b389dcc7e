-- lib.lua: helpers prepended to every script of this folder (after a leading #! line, if any).
--
-- Layout of one scope (three keys sharing the {hash tag} of their API key):
--   z  ZSET  reservation id -> entry time in ms
--   c  HASH  reservation id -> "requests:input_tokens:output_tokens"
--   u  HASH  running sums r, i, o of the entries in z
-- An entry counts while ts > now - window (the memory backend's rule, to the millisecond).

local CHUNK = 256 -- ids per ZRANGE/HMGET page, far below Lua's unpack limit

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function clock(arg)
  local now = tonumber(arg)
  if now < 0 then return now_ms() end
  return now
end

local function parse(v)
  local r, i, o = string.match(v, '^(-?%d+):(-?%d+):(-?%d+)$')
  return {tonumber(r), tonumber(i), tonumber(o)}
end

local function pack(t)
  return string.format('%d:%d:%d', t[1], t[2], t[3])
end

local function read_sums(u)
  local s = redis.call('HMGET', u, 'r', 'i', 'o')
  return {tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0}
end

local function write_sums(u, s)
  redis.call('HSET', u, 'r', string.format('%d', s[1]), 'i', string.format('%d', s[2]),
    'o', string.format('%d', s[3]))
end

-- Sum of the costs of the entries with ts <= horizon (expired), without changing anything.
-- Also returns their ids, page by page, to the callback if one is given.
local function expired_sums(z, c, horizon, each_page)
  local out, offset = {0, 0, 0}, 0
  while true do
    local ids = redis.call('ZRANGEBYSCORE', z, '-inf', horizon, 'LIMIT', offset, CHUNK)
    if #ids == 0 then break end
    local costs = redis.call('HMGET', c, unpack(ids))
    for k = 1, #ids do
      if costs[k] then
        local v = parse(costs[k])
        out[1], out[2], out[3] = out[1] + v[1], out[2] + v[2], out[3] + v[3]
      end
    end
    if each_page then each_page(ids) else offset = offset + #ids end
    if #ids < CHUNK then break end
  end
  return out
end

-- Remove the entries with ts <= horizon; returns the sums of what remains.
local function expire(z, c, u, horizon)
  local sums = read_sums(u)
  local removed = expired_sums(z, c, horizon, function(ids)
    redis.call('HDEL', c, unpack(ids))
    redis.call('ZREM', z, unpack(ids))
  end)
  if redis.call('EXISTS', z) == 0 then
    -- Nothing counts any more: drop costs and sums, so the sums can never drift.
    redis.call('DEL', c, u)
    return {0, 0, 0}
  end
  if removed[1] ~= 0 or removed[2] ~= 0 or removed[3] ~= 0 then
    for d = 1, 3 do sums[d] = sums[d] - removed[d] end
    write_sums(u, sums)
  end
  return sums
end

-- Time of the oldest entry with ts > horizon, or nil.
local function oldest_live(z, horizon)
  local first = redis.call('ZRANGEBYSCORE', z, '(' .. horizon, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first == 0 then return nil end
  return tonumber(first[2])
end

local function reset_ms(z, now, window)
  local first = oldest_live(z, now - window)
  if first == nil then return 0 end
  return first + window - now
end

local function touch(z, c, u, ttl)
  redis.call('PEXPIRE', z, ttl)
  redis.call('PEXPIRE', c, ttl)
  redis.call('PEXPIRE', u, ttl)
end
