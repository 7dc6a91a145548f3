-- fail: records failed attempts of running tasks. `retry` schedules another attempt after
-- delay_ms while attempts remain, else the task is dead; `fatal` fails it for good; `review`
-- parks it for a person (outcome unknown and not safe to repeat).
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: ready list prefix   KEYS[4]: prios zset
-- KEYS[5]: scheduled zset   KEYS[6]: failed list   KEYS[7]: dead list   KEYS[8]: review zset
-- KEYS[9]: events stream
-- ARGV[1]: events max length   ARGV[2]: item count n
-- ARGV[3..]: per item 6 values: id, token, server, error, disposition (retry|fatal|review), delay_ms
-- Returns: per item two values: applied 1|0, state code after the call (0 = no such task)
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 6] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local now = now_ms()
local fence, settle = fencer()
local add, flush = by_priority()
local ev = events(KEYS[9], ARGV[1])
local out, fields, applied = {}, {}, {}
for i = 0, n - 1 do
  local b = 3 + i * 6
  local id, server, err, disp, delay = ARGV[b], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], tonumber(ARGV[b + 5])
  local ok, current = fence(id, recs[i + 1], ARGV[b + 1])
  if ok then
    local r = head(recs[i + 1])
    local kind
    if disp == 'retry' and r.attempt < r.max_attempts then
      kind = 'retry'
      if delay > 0 then
        r.state = SCHEDULED
        redis.call('ZADD', KEYS[5], now + delay, id)
      else
        r.state = QUEUED
        add(r.priority, id)
      end
    elseif disp == 'review' then
      kind, r.state = 'review', REVIEW
      redis.call('ZADD', KEYS[8], now, id)
    elseif disp == 'retry' then
      kind, r.state, r.finished = 'dead', DEAD, now
      redis.call('RPUSH', KEYS[7], id)
    else
      kind, r.state, r.finished = 'fail', FAILED, now
      redis.call('RPUSH', KEYS[6], id)
    end
    local _, _, result = tail_of(r)
    fields[#fields + 1] = id
    fields[#fields + 1] = repack(r, server, err, result)
    applied[#applied + 1] = id
    settle(id, r.state)
    ev.add(kind, id, r.attempt, server, err)
    out[2 * i + 1], out[2 * i + 2] = 1, r.state
  else
    out[2 * i + 1], out[2 * i + 2] = 0, current
  end
end
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZREM', KEYS[2], unpack(applied))
  flush(KEYS[3], KEYS[4], false)
  ev.flush()
end
return out
