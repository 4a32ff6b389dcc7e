#!lua flags=no-writes
-- peek.lua: usage of each scope, read-only (the server refuses any write). Uses lib.lua.
--
-- KEYS: per scope s, three keys z, c, u (see lib.lua) at 3s-2, 3s-1, 3s; one {hash tag} for all.
-- ARGV:
--   1   now in ms, or -1 for the server's TIME
--   2.. per scope s at 1 + s: window ms
-- Expired entries are not removed (no writes): their costs are subtracted from the sums instead.
-- Returns integers: now ms, then per scope: used requests, input, output, reset ms.

local now = clock(ARGV[1])
local out = {now}
for s = 1, #KEYS / 3 do
  local z, c, u = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s]
  local window = tonumber(ARGV[1 + s])
  local used, reset = {0, 0, 0}, reset_ms(z, now, window)
  if reset > 0 then
    local sums = read_sums(u)
    local gone = expired_sums(z, c, now - window, nil)
    for d = 1, 3 do used[d] = sums[d] - gone[d] end
  end
  out[#out + 1] = used[1]
  out[#out + 1] = used[2]
  out[#out + 1] = used[3]
  out[#out + 1] = reset
end
return out
