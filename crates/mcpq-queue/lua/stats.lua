-- stats: counts the tasks of a queue per state, in one consistent snapshot.
-- KEYS[1]: ready list prefix   KEYS[2]: prios zset   KEYS[3]: scheduled zset   KEYS[4]: leases zset
-- KEYS[5]: review zset   KEYS[6..9]: succeeded, failed, dead, cancelled lists   KEYS[10]: meta hash
-- ARGV: none
-- Returns: {queued, scheduled, running, review, succeeded, failed, dead, cancelled, paused 0|1}
-- Errors: none of its own
local queued = 0
for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  queued = queued + redis.call('LLEN', KEYS[1] .. p)
end
local out = {queued}
for k = 3, 5 do out[#out + 1] = redis.call('ZCARD', KEYS[k]) end
for k = 6, 9 do out[#out + 1] = redis.call('LLEN', KEYS[k]) end
out[#out + 1] = (redis.call('HGET', KEYS[10], 'paused') == '1') and 1 or 0
return out
