-- release: hands running tasks back without spending an attempt (the call was not delivered,
-- or their server went away before it ran): to the head of their ready list, or scheduled
-- after delay_ms (e.g. a server's Retry-After).
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: ready list prefix   KEYS[4]: prios zset
-- KEYS[5]: scheduled zset   KEYS[6]: events stream
-- ARGV[1]: events max length   ARGV[2]: item count n
-- ARGV[3..]: per item 4 values: id, token, delay_ms, reason
-- Returns: per item {applied 1|0, state code after the call (0 = no such task)}
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 4] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local now
local out, fields, applied = {}, {}, {}
local front = {}
for i = 0, n - 1 do
  local b = 3 + i * 4
  local id, delay, reason = ARGV[b], tonumber(ARGV[b + 2]), ARGV[b + 3]
  local r, cur = fenced(recs[i + 1], ARGV[b + 1])
  if r then
    r.attempt, r.error = r.attempt - 1, reason
    if delay > 0 then
      now = now or now_ms()
      r.state = SCHEDULED
      redis.call('ZADD', KEYS[5], now + delay, id)
    else
      r.state = QUEUED
      front[#front + 1] = r
      front[#front + 1] = id
    end
    emit(KEYS[6], ARGV[1], 'release', id, 'e', reason)
    fields[#fields + 1] = id
    fields[#fields + 1] = pack_record(r)
    applied[#applied + 1] = id
    out[i + 1] = {1, r.state}
  else
    out[i + 1] = {0, cur and cur.state or 0}
  end
end
-- pushed to the head in reverse, so released tasks keep their claim order at the front
for j = #front - 1, 1, -2 do push_ready(KEYS[3], KEYS[4], front[j].priority, {front[j + 1]}, true) end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZREM', KEYS[2], unpack(applied))
end
return out
