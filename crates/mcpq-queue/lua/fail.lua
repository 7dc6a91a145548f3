-- fail: records failed attempts of running tasks. `retry` schedules another attempt after
-- delay_ms while attempts remain, else the task is dead; `fatal` fails it for good; `review`
-- parks it for a person (outcome unknown and not safe to repeat).
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: ready list prefix   KEYS[4]: prios zset
-- KEYS[5]: scheduled zset   KEYS[6]: failed zset   KEYS[7]: dead zset   KEYS[8]: review zset
-- KEYS[9]: events stream
-- ARGV[1]: events max length   ARGV[2]: item count n
-- ARGV[3..]: per item 6 values: id, token, server, error, disposition (retry|fatal|review), delay_ms
-- Returns: per item {applied 1|0, state code after the call (0 = no such task)}
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 6] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local now = now_ms()
local add, flush = by_priority()
local out, fields, applied = {}, {}, {}
for i = 0, n - 1 do
  local b = 3 + i * 6
  local id, server, err, disp, delay = ARGV[b], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], tonumber(ARGV[b + 5])
  local r, cur = fenced(recs[i + 1], ARGV[b + 1])
  if r then
    r.server, r.error = server, err
    if disp == 'retry' and r.attempt < r.max_attempts then
      if delay > 0 then
        r.state = SCHEDULED
        redis.call('ZADD', KEYS[5], now + delay, id)
      else
        r.state = QUEUED
        add(r.priority, id)
      end
      emit(KEYS[9], ARGV[1], 'retry', id, 'a', r.attempt, 's', server, 'e', err)
    elseif disp == 'review' then
      r.state = REVIEW
      redis.call('ZADD', KEYS[8], now, id)
      emit(KEYS[9], ARGV[1], 'review', id, 'a', r.attempt, 's', server, 'e', err)
    else
      r.finished = now
      if disp == 'retry' then
        r.state = DEAD
        redis.call('ZADD', KEYS[7], now, id)
        emit(KEYS[9], ARGV[1], 'dead', id, 'a', r.attempt, 's', server, 'e', err)
      else
        r.state = FAILED
        redis.call('ZADD', KEYS[6], now, id)
        emit(KEYS[9], ARGV[1], 'fail', id, 'a', r.attempt, 's', server, 'e', err)
      end
    end
    fields[#fields + 1] = id
    fields[#fields + 1] = pack_record(r)
    applied[#applied + 1] = id
    out[i + 1] = {1, r.state}
  else
    out[i + 1] = {0, cur and cur.state or 0}
  end
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZREM', KEYS[2], unpack(applied))
end
flush(KEYS[3], KEYS[4], false)
return out
