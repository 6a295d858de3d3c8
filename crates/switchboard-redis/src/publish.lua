-- Appends a message to a channel's log and broadcasts it, atomically, so
-- that offsets are contiguous and live messages leave in offset order.
-- Entries: id <offset>-0, fields e (epoch), r (the Redis run_id that wrote
-- it), t (time, ms), k (t/b), d (data).
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
-- This server run: a log written by another run (Redis restarted from a
-- snapshot, or failed over to a replica) may have lost its newest
-- messages, so its offsets cannot be trusted to go on: a new epoch.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or ''
local epoch, offset = ARGV[3], 1
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
local fresh = #last == 0
if not fresh then
  local fields, e, r = last[1][2], nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then e = fields[i + 1] end
    if fields[i] == 'r' then r = fields[i + 1] end
  end
  if r == run then
    epoch = e
    offset = tonumber(string.match(last[1][1], '^(%d+)')) + 1
  else
    fresh = true
  end
end
if fresh and redis.call('EXISTS', log) == 1 then
  -- Emptied, or of another run (its last id would refuse offset 1).
  redis.call('DEL', log)
end
redis.call('XADD', log, 'MAXLEN', ARGV[4], offset .. '-0',
  'e', epoch, 'r', run, 't', now, 'k', ARGV[2], 'd', ARGV[1])
redis.call('PEXPIRE', log, ttl)
-- Messages older than the history ttl leave, oldest first (at most 16 per
-- publish; the key itself expires a ttl after the newest).
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
