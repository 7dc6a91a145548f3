-- trim: forgets finished tasks beyond the retention count or age (succeeded, failed,
-- cancelled and dead; review is kept until a person acts).
-- KEYS[1]: tasks hash   KEYS[2..5]: succeeded, failed, cancelled, dead zsets
-- ARGV[1]: max tasks kept per state   ARGV[2]: max age (ms; 0 = no limit)
-- ARGV[3]: max tasks removed per state in this call
-- Returns: the number of tasks removed
-- Errors: none of its own
local keep, age, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local removed = 0
for k = 2, 5 do
  local z = KEYS[k]
  local ids = {}
  local excess = redis.call('ZCARD', z) - keep
  if excess > 0 then ids = redis.call('ZRANGE', z, 0, math.min(excess, limit) - 1) end
  if age > 0 and #ids < limit then
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - age, 'LIMIT', #ids, limit - #ids)
    for _, id in ipairs(old) do ids[#ids + 1] = id end
  end
  if #ids > 0 then
    redis.call('ZREM', z, unpack(ids))
    redis.call('HDEL', KEYS[1], unpack(ids))
    removed = removed + #ids
  end
end
return removed
