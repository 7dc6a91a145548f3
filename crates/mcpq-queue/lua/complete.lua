-- complete: records the results of running tasks as succeeded.
-- KEYS[1]: tasks hash   KEYS[2]: leases zset   KEYS[3]: succeeded list   KEYS[4]: events stream
-- ARGV[1]: events max length   ARGV[2]: item count n
-- ARGV[3..]: per item 4 values: id, token, server, result (MessagePack)
-- Returns: per item not applied, two values: its index (0-based) and its state code (0 = no
--          such task); every other item was applied and is succeeded. A stale token changes
--          nothing and publishes nothing. Empty in the usual case: a reply value per item
--          would cost the client a parse each
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 4] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local now = now_ms()
local fence, settle = fencer()
local ev = events(KEYS[4], ARGV[1])
local out, fields, applied, f, r = {}, {}, {}, 0, 0
for i = 0, n - 1 do
  local b = 3 + i * 4
  local id, server, raw = ARGV[b], ARGV[b + 2], recs[i + 1]
  local ok, current, flags, priority, attempt, max_attempts, claims, started, _, spec_len =
    fence(id, raw, ARGV[b + 1])
  if ok then
    local result = ARGV[b + 3]
    f = f + 1
    fields[2 * f - 1] = id
    fields[2 * f] = struct.pack(NEW_TAIL, 1, SUCCEEDED, flags, priority, attempt,
      max_attempts, claims, started, now, string.sub(raw, HEAD_LEN + 1, HDR_LEN + spec_len),
      #server, server, 0, '', #result, result)
    applied[f] = id
    settle(id, SUCCEEDED)
    ev.add('ok', id, attempt, server)
  else
    out[r + 1], out[r + 2] = i, current
    r = r + 2
  end
end
if f > 0 then
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZREM', KEYS[2], unpack(applied))
  redis.call('RPUSH', KEYS[3], unpack(applied))
  ev.flush()
end
return out
