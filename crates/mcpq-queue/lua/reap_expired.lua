-- reap_expired: takes back running tasks whose lease ran out (their mcpq replica died or
-- stalled). Whether the call ran is unknown: idempotent tasks go back to the head of their
-- ready list (or dead when no attempt is left), the others to review.
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: ready list prefix   KEYS[4]: prios zset
-- KEYS[5]: dead zset   KEYS[6]: review zset   KEYS[7]: events stream
-- ARGV[1]: events max length   ARGV[2]: max tasks
-- Returns: the number of tasks reaped
-- Errors: none of its own
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return 0 end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local reason = 'lease expired'
local fields = {}
for i, id in ipairs(ids) do
  local raw = recs[i]
  if raw then
    local r = unpack_record(raw)
    if r.state == RUNNING then
      r.error = reason
      if bit.band(r.flags, FLAG_IDEMPOTENT) == 0 then
        r.state = REVIEW
        redis.call('ZADD', KEYS[6], now, id)
        emit(KEYS[7], ARGV[1], 'review', id, 'a', r.attempt, 'e', reason)
      elseif r.attempt >= r.max_attempts then
        r.state, r.finished = DEAD, now
        redis.call('ZADD', KEYS[5], now, id)
        emit(KEYS[7], ARGV[1], 'dead', id, 'a', r.attempt, 'e', reason)
      else
        r.state = QUEUED
        push_ready(KEYS[3], KEYS[4], r.priority, {id}, true)
        emit(KEYS[7], ARGV[1], 'retry', id, 'a', r.attempt, 'e', reason)
      end
      fields[#fields + 1] = id
      fields[#fields + 1] = pack_record(r)
    end
  end
end
redis.call('ZREM', KEYS[2], unpack(ids))
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
return #fields / 2
