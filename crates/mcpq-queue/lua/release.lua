-- release: hands running tasks back without spending an attempt (the call was not delivered,
-- or their server went away before it ran): to the head of their ready list, in the order
-- given, or scheduled after delay_ms (e.g. a server's Retry-After).
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: ready list prefix   KEYS[4]: prios zset
-- KEYS[5]: scheduled zset   KEYS[6]: events stream
-- ARGV[1]: events max length   ARGV[2]: item count n
-- ARGV[3..]: per item 4 values: id, token, delay_ms, reason
-- Returns: per item two values: applied 1|0, state code after the call (0 = no such task)
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 4] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local now
local fence, settle = fencer()
local add, flush = by_priority()
local ev = events(KEYS[6], ARGV[1])
local out, fields, applied = {}, {}, {}
for i = 0, n - 1 do
  local b = 3 + i * 4
  local id, delay, reason = ARGV[b], tonumber(ARGV[b + 2]), ARGV[b + 3]
  local ok, current = fence(id, recs[i + 1], ARGV[b + 1])
  if ok then
    local r = head(recs[i + 1])
    r.attempt = r.attempt - 1
    if delay > 0 then
      now = now or now_ms()
      r.state = SCHEDULED
      redis.call('ZADD', KEYS[5], now + delay, id)
    else
      r.state = QUEUED
      add(r.priority, id)
    end
    local server, _, result = tail_of(r)
    fields[#fields + 1] = id
    fields[#fields + 1] = repack(r, server, reason, result)
    applied[#applied + 1] = id
    settle(id, r.state)
    ev.add('release', id, nil, nil, reason)
    out[2 * i + 1], out[2 * i + 2] = 1, r.state
  else
    out[2 * i + 1], out[2 * i + 2] = 0, current
  end
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZREM', KEYS[2], unpack(applied))
  flush(KEYS[3], KEYS[4], true)
  ev.flush()
end
return out
