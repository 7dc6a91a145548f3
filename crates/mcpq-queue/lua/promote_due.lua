-- promote_due: moves scheduled tasks whose time has come to the tail of their ready list.
-- KEYS[1]: tasks hash   KEYS[2]: ready list prefix   KEYS[3]: prios zset
-- KEYS[4]: scheduled zset   KEYS[5]: events stream
-- ARGV[1]: events max length   ARGV[2]: max tasks
-- Returns: the number of tasks promoted
-- Errors: none of its own
local ids = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
if #ids == 0 then return 0 end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local add, flush = by_priority()
local ev = events(KEYS[5], ARGV[1])
local fields = {}
for i, id in ipairs(ids) do
  if recs[i] then
    local r = head(recs[i])
    r.state = QUEUED
    fields[#fields + 1] = id
    fields[#fields + 1] = repack(r)
    add(r.priority, id)
    ev.add('promote', id)
  end
end
redis.call('ZREM', KEYS[4], unpack(ids))
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
flush(KEYS[2], KEYS[3], false)
ev.flush()
return #fields / 2
