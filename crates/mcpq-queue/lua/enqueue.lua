-- enqueue: stores a batch of new tasks as queued (or scheduled when delayed) with their events.
-- KEYS[1]: tasks hash   KEYS[2]: ready list prefix   KEYS[3]: prios zset
-- KEYS[4]: scheduled zset   KEYS[5]: events stream
-- KEYS[6..]: the idempotency keys of the tasks that carry one
-- ARGV[1]: events max length   ARGV[2]: idempotency key ttl (ms)   ARGV[3]: task count n
-- ARGV[4..]: per task 7 values: id (16 bytes), priority, max_attempts, flags, delay_ms,
--            index into KEYS of its idempotency key (0 = none), spec
-- Returns: per task two values, code and id: 0 created; 1 already there (same id, or same
--          idempotency key and body: id is the existing task); 2 conflict (key held by another
--          body: id is the holder)
-- Errors: none of its own; a failed command aborts the script with nothing written
local n = tonumber(ARGV[3])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[4 + i * 7] end
local present = redis.call('HMGET', KEYS[1], unpack(ids))
local add, flush = by_priority()
local ev = events(KEYS[5], ARGV[1])
local fields, sched, seen, out = {}, {}, {}, {}
local now
for i = 0, n - 1 do
  local b = 4 + i * 7
  local id, delay, ik, spec = ARGV[b], tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5]), ARGV[b + 6]
  local code, holder = 0, id
  if present[i + 1] or seen[id] then
    code = 1
  elseif ik > 0 then
    local digest = redis.sha1hex(table.concat({ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], spec}, '|'))
    local held = redis.call('GET', KEYS[ik])
    if held then
      holder = string.sub(held, 1, 16)
      code = (string.sub(held, 17) == digest) and 1 or 2
    else
      redis.call('SET', KEYS[ik], id .. digest, 'PX', ARGV[2])
    end
  end
  if code == 0 then
    seen[id] = true
    local priority = tonumber(ARGV[b + 1])
    local state = QUEUED
    if delay > 0 then
      state = SCHEDULED
      now = now or now_ms()
      sched[#sched + 1] = now + delay
      sched[#sched + 1] = id
    else
      add(priority, id)
    end
    fields[#fields + 1] = id
    fields[#fields + 1] = new_record(state, ARGV[b + 3], priority, ARGV[b + 2], spec)
    ev.add('enq', id)
  end
  out[2 * i + 1], out[2 * i + 2] = code, holder
end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if #sched > 0 then redis.call('ZADD', KEYS[4], unpack(sched)) end
flush(KEYS[2], KEYS[3], false)
ev.flush()
return out
