-- claim: moves up to N ready tasks to running under a lease, highest priority first, FIFO
-- within a priority; with aging, a task's rank is created_ms - priority * aging_ms.
-- KEYS[1]: tasks hash   KEYS[2]: ready list prefix   KEYS[3]: prios zset
-- KEYS[4]: leases zset   KEYS[5]: events stream   KEYS[6]: meta hash
-- ARGV[1]: events max length   ARGV[2]: max tasks   ARGV[3]: lease (ms)
-- ARGV[4]: aging (ms per priority step; 0 = strict priority)   ARGV[5]: max priority levels read
-- Returns: {} when paused or empty; else {now_ms, deadline_ms, ids, record1, record2, ...}: ids
--          the claimed ids, 16 bytes each, in the order of the records, each record as
--          rewritten (running, attempt + 1, claims + 1 = its fencing token); one string for the
--          ids, not one per task, as every reply value costs the client a parse
-- Errors: none of its own
if redis.call('HGET', KEYS[6], 'paused') == '1' then return {} end
local want, aging = tonumber(ARGV[2]), tonumber(ARGV[4])
local levels = redis.call('ZRANGE', KEYS[3], 0, tonumber(ARGV[5]) - 1)
local ids = {}
if aging == 0 then
  for _, p in ipairs(levels) do
    local ask = want - #ids
    local got = redis.call('LPOP', KEYS[2] .. p, ask)
    if got then for _, id in ipairs(got) do ids[#ids + 1] = id end end
    if not got or #got < ask then redis.call('ZREM', KEYS[3], p) end
    if #ids >= want then break end
  end
else
  -- k-way merge of the list heads; a UUIDv7 id starts with its creation time in ms
  local cands, pos = {}, {}
  for li, p in ipairs(levels) do
    cands[li] = redis.call('LRANGE', KEYS[2] .. p, 0, want - 1)
    pos[li] = 1
  end
  while #ids < want do
    local best, best_rank
    for li, p in ipairs(levels) do
      local id = cands[li][pos[li]]
      if id then
        local rank = struct.unpack('>I6', id) - tonumber(p) * aging
        if not best or rank < best_rank then best, best_rank = li, rank end
      end
    end
    if not best then break end
    ids[#ids + 1] = cands[best][pos[best]]
    pos[best] = pos[best] + 1
  end
  for li, p in ipairs(levels) do
    local taken = pos[li] - 1
    if taken > 0 then
      local key = KEYS[2] .. p
      redis.call('LTRIM', key, taken, -1)
      if taken == #cands[li] and (taken < want or redis.call('LLEN', key) == 0) then
        redis.call('ZREM', KEYS[3], p)
      end
    end
  end
end
if #ids == 0 then return {} end
local now = now_ms()
local deadline = now + tonumber(ARGV[3])
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local ev = events(KEYS[5], ARGV[1])
-- the deadline as a string once: redis.call formats a number argument with sprintf each time
local out, fields, leases, score = {now, deadline, ''}, {}, {}, tostring(deadline)
local got, o, f = {}, 3, 0
for i, id in ipairs(ids) do
  local raw = recs[i]
  -- a listed id always has a record; skipping a missing one keeps the batch going
  if raw then
    local _, _, flags, priority, attempt, max_attempts, claims, _, finished = struct.unpack(HEAD, raw)
    local rec = struct.pack(KEEP_REST, 1, RUNNING, flags, priority, attempt + 1, max_attempts,
      claims + 1, now, finished, string.sub(raw, HEAD_LEN + 1))
    fields[f + 1], fields[f + 2] = id, rec
    leases[f + 1], leases[f + 2] = score, id
    f = f + 2
    o = o + 1
    out[o] = rec
    got[o - 3] = id
    ev.add('run', id, attempt + 1)
  end
end
out[3] = table.concat(got)
if f > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZADD', KEYS[4], unpack(leases))
  keep_skiplist(KEYS[4])
  ev.flush()
end
return out
