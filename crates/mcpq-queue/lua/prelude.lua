-- Prelude prepended to every script: the task record layout, state codes, the store clock,
-- ready-list helpers and event appends. Defines locals only; writes nothing by itself.
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
local QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, DEAD, REVIEW, CANCELLED = 1, 2, 3, 4, 5, 6, 7, 8
local FLAG_IDEMPOTENT = 1

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function read_str(raw, pos)
  local len, nxt = struct.unpack('>I4', raw, pos)
  return string.sub(raw, nxt, nxt + len - 1), nxt + len
end

local function unpack_record(raw)
  local r = {}
  local _
  _, r.state, r.flags, r.priority, r.attempt, r.max_attempts, r.claims, r.started, r.finished,
    r.spec_len = struct.unpack(HDR, raw)
  r.spec = string.sub(raw, HDR_LEN + 1, HDR_LEN + r.spec_len)
  local pos = HDR_LEN + r.spec_len + 1
  if pos <= #raw then
    r.server, pos = read_str(raw, pos)
    r.error, pos = read_str(raw, pos)
    r.result = read_str(raw, pos)
  end
  return r
end

local function pack_record(r)
  local s = struct.pack(HDR, 1, r.state, r.flags, r.priority, r.attempt, r.max_attempts, r.claims,
    r.started, r.finished, #r.spec) .. r.spec
  if r.server or r.error or r.result then
    local server, err, result = r.server or '', r.error or '', r.result or ''
    s = s .. struct.pack('>I4', #server) .. server .. struct.pack('>I4', #err) .. err
      .. struct.pack('>I4', #result) .. result
  end
  return s
end

-- The record when `token` is the task's latest claim and it is still running; otherwise nil
-- and the record as it is (nil when the task does not exist).
local function fenced(raw, token)
  if not raw then return nil, nil end
  local r = unpack_record(raw)
  if r.state ~= RUNNING or r.claims ~= tonumber(token) then return nil, r end
  return r, r
end

-- Appends one event; `...` are extra field/value pairs.
local function emit(stream, max, kind, id, ...)
  redis.call('XADD', stream, 'MAXLEN', '~', max, '*', 'k', kind, 't', id, ...)
end

-- Pushes ids (all of one priority) onto their ready list, at the head when `front`.
local function push_ready(prefix, prios, priority, ids, front)
  local len = redis.call(front and 'LPUSH' or 'RPUSH', prefix .. priority, unpack(ids))
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
