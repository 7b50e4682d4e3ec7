-- recon_used.lua: one slice of a reconciler check's read of the per-user usage, with
-- the position (creation log length, last outbox entry) it was read at, so the caller
-- can take back the changes made since the check's instant T. Writes nothing.
--
-- KEYS[1] fg:{sku}:used   KEYS[2] fg:{sku}:rlog   KEYS[3] fg:{sku}:outbox
-- ARGV[1] 'scan': ARGV[2] HSCAN cursor, ARGV[3] HSCAN COUNT
--         'users': ARGV[2..] the users to read
--
-- Reply: {next cursor ('0' when done, '' for 'users'), log length, outbox position,
--         then user, units per user}   (units '0' for a user without a usage record;
--         the units are the first field of a usage record, lib.lua)
local used, log, outbox = KEYS[1], KEYS[2], KEYS[3]
local last = redis.call('XREVRANGE', outbox, '+', '-', 'COUNT', 1)
local reply = { '', redis.call('LLEN', log), (#last > 0) and last[1][1] or '0-0' }
if ARGV[1] == 'scan' then
  local scan = redis.call('HSCAN', used, ARGV[2], 'COUNT', ARGV[3])
  reply[1] = scan[1]
  local entries = scan[2]
  for i = 1, #entries, 2 do
    reply[#reply + 1] = entries[i]
    reply[#reply + 1] = string.match(entries[i + 1], '^%S+')
  end
else
  for i = 2, #ARGV do
    reply[#reply + 1] = ARGV[i]
    reply[#reply + 1] = string.match(redis.call('HGET', used, ARGV[i]) or '0', '^%S+')
  end
end
return reply
