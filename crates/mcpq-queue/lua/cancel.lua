-- cancel: cancels a task that has not finished (queued, scheduled, running or in review). A
-- running task's holder is fenced off: its late result is rejected.
-- KEYS[1]: tasks hash   KEYS[2]: ready list prefix   KEYS[3]: prios zset   KEYS[4]: scheduled zset
-- KEYS[5]: leases zset   KEYS[6]: review zset   KEYS[7]: cancelled list   KEYS[8]: events stream
-- ARGV[1]: events max length   ARGV[2]: id
-- Returns: {1, state it was in} cancelled; {0, its state} already finished; {-1, 0} no such task
-- Errors: none of its own
local id = ARGV[2]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return {-1, 0} end
local r = head(raw)
local was = r.state
if was == QUEUED then
  remove_ready(KEYS[2], KEYS[3], r.priority, id)
elseif was == SCHEDULED then
  redis.call('ZREM', KEYS[4], id)
elseif was == RUNNING then
  redis.call('ZREM', KEYS[5], id)
elseif was == REVIEW then
  redis.call('ZREM', KEYS[6], id)
else
  return {0, was}
end
local now = now_ms()
r.state, r.finished = CANCELLED, now
redis.call('HSET', KEYS[1], id, repack(r))
redis.call('RPUSH', KEYS[7], id)
local ev = events(KEYS[8], ARGV[1])
ev.add('cancel', id)
ev.flush()
return {1, was}
