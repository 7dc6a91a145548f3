-- reap_expired: takes back running tasks whose lease ran out (their mcpq replica died or
-- stalled). Whether the call ran is unknown: idempotent tasks go back to the head of their
-- ready list (or dead when no attempt is left), the others to review.
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: ready list prefix   KEYS[4]: prios zset
-- KEYS[5]: dead list   KEYS[6]: review zset   KEYS[7]: events stream
-- ARGV[1]: events max length   ARGV[2]: max tasks
-- Returns: the number of tasks reaped
-- Errors: none of its own
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return 0 end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local reason = 'lease expired'
local add, flush = by_priority()
local ev = events(KEYS[7], ARGV[1])
local fields = {}
for i, id in ipairs(ids) do
  local r = recs[i] and head(recs[i])
  if r and r.state == RUNNING then
    local kind
    if bit.band(r.flags, FLAG_IDEMPOTENT) == 0 then
      kind, r.state = 'review', REVIEW
      redis.call('ZADD', KEYS[6], now, id)
    elseif r.attempt >= r.max_attempts then
      kind, r.state, r.finished = 'dead', DEAD, now
      redis.call('RPUSH', KEYS[5], id)
    else
      kind, r.state = 'retry', QUEUED
      add(r.priority, id)
    end
    local server, _, result = tail_of(r)
    fields[#fields + 1] = id
    fields[#fields + 1] = repack(r, server, reason, result)
    ev.add(kind, id, r.attempt, nil, reason)
  end
end
redis.call('ZREM', KEYS[2], unpack(ids))
if #fields > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  flush(KEYS[3], KEYS[4], true)
  ev.flush()
end
return #fields / 2
