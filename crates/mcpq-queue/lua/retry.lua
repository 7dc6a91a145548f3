-- retry: puts a task that ended in review, dead, failed or cancelled back in its ready list
-- with a fresh attempt budget (the operator's `mcpq task retry`).
-- KEYS[1]: tasks hash   KEYS[2]: ready list prefix   KEYS[3]: prios zset   KEYS[4]: review zset
-- KEYS[5]: dead list   KEYS[6]: failed list   KEYS[7]: cancelled list   KEYS[8]: events stream
-- ARGV[1]: events max length   ARGV[2]: id
-- Returns: {1, state it left} requeued; {0, its state} not retryable from there; {-1, 0} no such task
-- Errors: none of its own
local id = ARGV[2]
local raw = redis.call('HGET', KEYS[1], id)
if not raw then return {-1, 0} end
local r = head(raw)
local was = r.state
local from = ({[REVIEW] = KEYS[4], [DEAD] = KEYS[5], [FAILED] = KEYS[6], [CANCELLED] = KEYS[7]})[was]
if not from then return {0, was} end
if was == REVIEW then
  redis.call('ZREM', from, id)
else
  -- finished lists are in finish order; taking one out is O(length), fine for an operator
  redis.call('LREM', from, 1, id)
end
r.state, r.attempt, r.finished = QUEUED, 0, 0
redis.call('HSET', KEYS[1], id, repack(r))
push_ready(KEYS[2], KEYS[3], r.priority, {id}, false)
local ev = events(KEYS[8], ARGV[1])
ev.add('retried', id)
ev.flush()
return {1, was}
