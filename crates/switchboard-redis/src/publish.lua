-- Appends a message to a channel's log and broadcasts it, atomically, so
-- that offsets are contiguous and live messages leave in offset order.
-- KEYS[1]: the log (stream; entry id = offset), KEYS[2]: idempotency key
-- ARGV: data, kind ("t"/"b"), new epoch, history size, history ttl ms,
--       idempotency window ms, live channel, has key ("1"/"0")
-- Returns {duplicate (0/1), epoch, offset}.
local log, idem = KEYS[1], KEYS[2]
if ARGV[8] == '1' then
  local seen = redis.call('GET', idem)
  if seen then
    local epoch, offset = string.match(seen, '^(%S*) (%d+)$')
    return {1, epoch, tonumber(offset)}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
local epoch, offset = ARGV[3], 1
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
if #last > 0 then
  offset = tonumber(string.match(last[1][1], '^(%d+)')) + 1
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then epoch = fields[i + 1] end
  end
elseif redis.call('EXISTS', log) == 1 then
  -- Emptied (its last id would refuse offset 1): a new log.
  redis.call('DEL', log)
end
redis.call('XADD', log, 'MAXLEN', ARGV[4], offset .. '-0',
  'e', epoch, 't', now, 'k', ARGV[2], 'd', ARGV[1])
redis.call('PEXPIRE', log, ttl)
-- Messages older than the history ttl leave, oldest first (a few per
-- publish; readers skip any that remain).
for _ = 1, 16 do
  local first = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #first == 0 or first[1][1] == offset .. '-0' then break end
  local f, at = first[1][2], nil
  for i = 1, #f, 2 do
    if f[i] == 't' then at = tonumber(f[i + 1]) end
  end
  if at == nil or at >= now - ttl then break end
  redis.call('XDEL', log, first[1][1])
end
if ARGV[8] == '1' then
  redis.call('SET', idem, epoch .. ' ' .. offset, 'PX', ARGV[6])
end
local header = cjson.encode({o = offset, e = epoch, t = now, b = (ARGV[2] == 'b')})
redis.call('PUBLISH', ARGV[7], header .. '\n' .. ARGV[1])
return {0, epoch, offset}
