-- complete: records the results of running tasks as succeeded.
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: succeeded zset   KEYS[4]: events stream
-- ARGV[1]: events max length   ARGV[2]: item count n
-- ARGV[3..]: per item 4 values: id, token, server, result (MessagePack)
-- Returns: per item {applied 1|0, state code after the call (0 = no such task)}; a stale token
--          changes nothing and publishes nothing
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 4] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local now = now_ms()
local out, fields, done, applied = {}, {}, {}, {}
for i = 0, n - 1 do
  local b = 3 + i * 4
  local id = ARGV[b]
  local r, cur = fenced(recs[i + 1], ARGV[b + 1])
  if r then
    r.state, r.finished, r.server, r.error, r.result = SUCCEEDED, now, ARGV[b + 2], '', ARGV[b + 3]
    fields[#fields + 1] = id
    fields[#fields + 1] = pack_record(r)
    done[#done + 1] = now
    done[#done + 1] = id
    applied[#applied + 1] = id
    emit(KEYS[4], ARGV[1], 'ok', id, 'a', r.attempt, 's', ARGV[b + 2])
    out[i + 1] = {1, SUCCEEDED}
  else
    out[i + 1] = {0, cur and cur.state or 0}
  end
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZREM', KEYS[2], unpack(applied))
  redis.call('ZADD', KEYS[3], unpack(done))
end
return out
