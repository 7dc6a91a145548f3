-- renew: extends the leases of running tasks still held under the given tokens.
-- KEYS[1]: tasks hash   KEYS[2]: leases zset
-- ARGV[1]: lease (ms)   ARGV[2]: item count n   ARGV[3..]: per item: id, token
-- Returns: {deadline_ms, ok1, ok2, ...}: 1 renewed, 0 the token no longer holds the task
-- Errors: none of its own
local n = tonumber(ARGV[2])
local ids = {}
for i = 0, n - 1 do ids[i + 1] = ARGV[3 + i * 2] end
local recs = redis.call('HMGET', KEYS[1], unpack(ids))
local deadline = now_ms() + tonumber(ARGV[1])
local fence = fencer()
local out, leases = {deadline}, {}
for i = 0, n - 1 do
  local ok = fence(ids[i + 1], recs[i + 1], ARGV[4 + i * 2])
  if ok then
    leases[#leases + 1] = deadline
    leases[#leases + 1] = ids[i + 1]
  end
  out[#out + 1] = ok and 1 or 0
end
if #leases > 0 then redis.call('ZADD', KEYS[2], 'XX', unpack(leases)) end
return out
