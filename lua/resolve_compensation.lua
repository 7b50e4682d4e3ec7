-- resolve_compensation.lua: resolve a compensation the flush has not written to MySQL
-- yet; the flush applies the resolve after writing the compensation.
--
-- KEYS[1] fg:{sku}:comps   KEYS[2] fg:{sku}:outbox
-- ARGV[1] compensation id   ARGV[2] refund reference or ''   ARGV[3] note or ''
--         (appended to the record with the time: [8] resolved_at ms, [9], [10])
--
-- Replies: {'ok', record JSON}   resolved now or before (idempotent)
--          {'not_found'}         no unflushed record (MySQL has it, or it never existed)
--
-- Invariant: a resolve is recorded once in the outbox, after its compensation's event,
-- so MySQL never sees a resolve for a compensation it does not have yet.
local comps, outbox, id = KEYS[1], KEYS[2], ARGV[1]
local raw = redis.call('HGET', comps, id)
if not raw then
  return { 'not_found' }
end
local record = cjson.decode(raw)
if record[7] ~= 'resolved' then
  local at = string.format('%d', now_ms())
  record[7] = 'resolved'
  record[8], record[9], record[10] = at, ARGV[2], ARGV[3]
  raw = cjson.encode(record)
  redis.call('HSET', comps, id, raw)
  redis.call('XADD', outbox, '*', 'type', 'compensation_resolved', 'id', id,
    'at', at, 'refund_ref', ARGV[2], 'note', ARGV[3])
end
return { 'ok', raw }
