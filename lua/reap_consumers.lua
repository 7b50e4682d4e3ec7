-- reap_consumers.lua: drop the flush group's consumers that stopped (a worker that
-- exited or died), so they do not pile up in every outbox group, one per restart.
--
-- KEYS[1] fg:{sku}:outbox
-- ARGV[1] group name   ARGV[2] least idle time (ms) of a consumer to drop
-- ARGV[3] a consumer never to drop (the caller)
--
-- Reply: how many consumers were dropped.
--
-- Invariant: only a consumer with no pending entry is dropped, checked in the same
-- atomic step, so no unacknowledged event ever loses its place in the group (a dead
-- worker's pending entries are claimed by another one first, see worker.rs).
local outbox, group, min_idle, keep = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('EXISTS', outbox) == 0 then
  return 0
end
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', outbox, group)
if not ok then
  return 0 -- no such group (yet)
end
local dropped = 0
for _, consumer in ipairs(consumers) do
  local c = {}
  for i = 1, #consumer, 2 do
    c[consumer[i]] = consumer[i + 1]
  end
  if c['name'] ~= keep and c['pending'] == 0 and c['idle'] >= min_idle then
    redis.call('XGROUP', 'DELCONSUMER', outbox, group, c['name'])
    dropped = dropped + 1
  end
end
return dropped
