-- trim: forgets finished tasks beyond the retention count or age (succeeded, failed,
-- cancelled and dead; review is kept until a person acts). Finished lists are in finish order,
-- so both limits take from their heads.
-- KEYS[1]: tasks hash   KEYS[2..5]: succeeded, failed, cancelled, dead lists
-- ARGV[1]: max tasks kept per state   ARGV[2]: max age (ms; 0 = no limit)
-- ARGV[3]: max tasks removed per state in this call
-- Returns: the number of tasks removed
-- Errors: none of its own
local keep, age, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cutoff = now_ms() - age
local removed = 0
for k = 2, 5 do
  local list = KEYS[k]
  local n = math.min(math.max(redis.call('LLEN', list) - keep, 0), limit)
  if age > 0 and n < limit then
    -- past the count limit, the oldest that finished before the cutoff
    local ids = redis.call('LRANGE', list, n, limit - 1)
    if #ids > 0 then
      local recs = redis.call('HMGET', KEYS[1], unpack(ids))
      for i = 1, #ids do
        local finished = recs[i] and select(9, struct.unpack(HEAD, recs[i]))
        if finished and finished > cutoff then break end
        n = n + 1
      end
    end
  end
  if n > 0 then
    local ids = redis.call('LPOP', list, n)
    redis.call('HDEL', KEYS[1], unpack(ids))
    removed = removed + n
  end
end
return removed
