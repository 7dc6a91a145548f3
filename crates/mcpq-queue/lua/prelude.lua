-- Prelude prepended to every script: the task record layout, state codes, the store clock,
-- ready-list helpers and batched event appends. Defines locals only; writes nothing itself.
--
-- A task record (the value of its id in the queue's `tasks` hash):
--   header '>BBBi4HHI4I6I6I4': version, state, flags, priority, attempt, max_attempts,
--          claims (fencing token of the latest claim), started_ms, finished_ms, spec_len
--   spec   MessagePack written by the producer; never decoded here
--   tail   optional: server, error, result, each a '>I4'-length-prefixed string
-- Ready tasks sit in one list per priority (`<ready prefix><priority>`); the `prios` zset
-- holds exactly the priorities whose list is non-empty, scored -priority.
local HDR = '>BBBi4HHI4I6I6I4'
local HDR_LEN = 31
-- the header up to spec_len, which a rewrite never changes; a rewritten record is one
-- struct.pack of it followed by the rest as it was (KEEP_REST), or by the spec section as it
-- was and a new tail (NEW_TAIL: spec section, then length and bytes of server, error, result)
local HEAD = '>BBBi4HHI4I6I6'
local HEAD_LEN = 27
local KEEP_REST = HEAD .. 'c0'
local NEW_TAIL = HEAD .. 'c0I4c0I4c0I4c0'
local QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, DEAD, REVIEW, CANCELLED = 1, 2, 3, 4, 5, 6, 7, 8
local FLAG_IDEMPOTENT = 1

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The header fields of a stored record, with the record itself as `raw`.
local function head(raw)
  local r = {raw = raw}
  local _
  _, r.state, r.flags, r.priority, r.attempt, r.max_attempts, r.claims, r.started, r.finished,
    r.spec_len = struct.unpack(HDR, raw)
  return r
end

local NEW = HDR .. 'c0'

-- A new task's record; numeric arguments may be numeric strings (struct converts them).
local function new_record(state, flags, priority, max_attempts, spec)
  return struct.pack(NEW, 1, state, flags, priority, 0, max_attempts, 0, 0, 0, #spec, spec)
end

-- The tail fields of a record: server, error, result ('' where unset).
local function tail_of(r)
  local pos = HDR_LEN + r.spec_len + 1
  if pos > #r.raw then return '', '', '' end
  local function read(p)
    local len, nxt = struct.unpack('>I4', r.raw, p)
    return string.sub(r.raw, nxt, nxt + len - 1), nxt + len
  end
  local server, err, result
  server, pos = read(pos)
  err, pos = read(pos)
  result = read(pos)
  return server, err, result
end

-- The record with r's header fields; the tail replaced when server/err/result are given.
local function repack(r, server, err, result)
  if server == nil then
    return struct.pack(KEEP_REST, 1, r.state, r.flags, r.priority, r.attempt, r.max_attempts,
      r.claims, r.started, r.finished, string.sub(r.raw, HEAD_LEN + 1))
  end
  return struct.pack(NEW_TAIL, 1, r.state, r.flags, r.priority, r.attempt, r.max_attempts,
    r.claims, r.started, r.finished, string.sub(r.raw, HEAD_LEN + 1, HDR_LEN + r.spec_len),
    #server, server, #err, err, #result, result)
end

-- Settle-batch fencing. `fence(id, raw, token)` answers the record's header values (version,
-- state, flags, priority, attempt, max_attempts, claims, started, finished, spec_len) when
-- `token` is the task's latest claim and it is still running; otherwise nil and the task's
-- current state (0: no such task). `settle(id, state)` records a settle, so a task named twice
-- in one batch is settled once. Plain values, no table: on this hot path a table per record
-- costs more than everything else done with the record.
local function fencer()
  local settled = {}
  return function(id, raw, token)
    if settled[id] then return nil, settled[id] end
    if not raw then return nil, 0 end
    local v, state, flags, priority, attempt, max_attempts, claims, started, finished, spec_len =
      struct.unpack(HDR, raw)
    if state ~= RUNNING or claims ~= tonumber(token) then return nil, state end
    return v, state, flags, priority, attempt, max_attempts, claims, started, finished, spec_len
  end, function(id, state) settled[id] = state end
end

-- Collects the events of one script call and appends them as one stream entry per kind:
-- `k` kind, `t` the task ids (16 bytes each), and per task, as MessagePack arrays where the
-- kind carries them, `a` attempt, `s` server, `e` error. A reader numbers the tasks of an
-- entry, so each event keeps an id of its own: `<entry id>.<index>`. Which of `a`, `s`, `e` a
-- kind carries is set by its first event in the call; every call site passes the same
-- fields for a kind. Called once per task on the hot path, so it keeps only the arrays the
-- kind carries and counts with plain counters.
local function events(stream, max)
  local kinds, order = {}, {}
  local ev = {}
  function ev.add(kind, id, attempt, server, err)
    local e = kinds[kind]
    if not e then
      e = {n = 0, ids = {}, a = attempt and {}, s = server and {}, e = err and {}}
      kinds[kind] = e
      order[#order + 1] = kind
    end
    local n = e.n + 1
    e.n = n
    e.ids[n] = id
    local t = e.a
    if t then t[n] = attempt or 0 end
    t = e.s
    if t then t[n] = server or '' end
    t = e.e
    if t then t[n] = err or '' end
  end
  function ev.flush()
    for _, kind in ipairs(order) do
      local e = kinds[kind]
      local args = {'XADD', stream, 'MAXLEN', '~', max, '*', 'k', kind, 't', table.concat(e.ids)}
      if e.a then args[#args + 1] = 'a'; args[#args + 1] = cmsgpack.pack(e.a) end
      if e.s then args[#args + 1] = 's'; args[#args + 1] = cmsgpack.pack(e.s) end
      if e.e then args[#args + 1] = 'e'; args[#args + 1] = cmsgpack.pack(e.e) end
      redis.call(unpack(args))
    end
  end
  return ev
end

-- Keeps a zset in Redis's skiplist encoding. Up to zset-max-listpack-entries members (128 by
-- default) a zset is a listpack, which ZADD and ZREM scan end to end for every member: with a
-- hundred tasks running, that was a quarter of the claim and complete scripts' work. A
-- member longer than zset-max-listpack-value (64 by default) converts the zset, and removing it
-- again does not convert it back; a zset left empty is deleted and starts over small.
local function keep_skiplist(key)
  if redis.call('OBJECT', 'ENCODING', key) ~= 'skiplist' then
    local wide = string.rep('.', 1025)
    redis.call('ZADD', key, 0, wide)
    redis.call('ZREM', key, wide)
  end
end

-- Pushes ids (all of one priority) onto their ready list: at the tail, or at the head when
-- `front`, keeping their order either way.
local function push_ready(prefix, prios, priority, ids, front)
  local len
  if front then
    local rev = {}
    for i = #ids, 1, -1 do rev[#rev + 1] = ids[i] end
    len = redis.call('LPUSH', prefix .. priority, unpack(rev))
  else
    len = redis.call('RPUSH', prefix .. priority, unpack(ids))
  end
  if len == #ids then redis.call('ZADD', prios, -priority, priority) end
end

-- Removes one id from its ready list (O(list length): cancel only).
local function remove_ready(prefix, prios, priority, id)
  local key = prefix .. priority
  redis.call('LREM', key, 1, id)
  if redis.call('LLEN', key) == 0 then redis.call('ZREM', prios, priority) end
end

-- Groups ids by priority, keeping their order, for push_ready.
local function by_priority()
  local groups, order = {}, {}
  return function(priority, id)
    local g = groups[priority]
    if not g then g = {}; groups[priority] = g; order[#order + 1] = priority end
    g[#g + 1] = id
  end, function(prefix, prios, front)
    for _, p in ipairs(order) do push_ready(prefix, prios, p, groups[p], front) end
  end
end
