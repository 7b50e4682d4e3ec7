-- reserve.lua: take a hold on a SKU for one user, or say why not.
--
-- KEYS[1] fg:{sku}:meta       KEYS[2] fg:{sku}:used      KEYS[3] fg:{sku}:deadlines
-- KEYS[4] fg:{sku}:idem:<n>:<user>:<key>                 KEYS[5] fg:{sku}:r:<new rid>
-- ARGV[1] user id   ARGV[2] quantity (>= 1)   ARGV[3] new reservation id
-- ARGV[4] idempotency TTL (ms)                ARGV[5] expired holds to reclaim before sold_out
--
-- Replies:
--   {'created',  rid, user, quantity, status, expires_at, created_at, payment_ref}
--   {'replayed', rid, user, quantity, status, expires_at, created_at, payment_ref}
--   {'idempotency_key_reused'} {'not_found'} {'not_started'} {'ended'}
--   {'limit_exceeded'} {'sold_out'}
--
-- Invariants: a rejection writes nothing but the reclaim of already expired holds;
-- one idempotency key creates at most one hold; available never goes below 0.
local meta, used, deadlines, idem_key, rkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local user, quantity, rid = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()

local prior = redis.call('GET', idem_key)
if prior then
  local space = string.find(prior, ' ', 1, true)
  if tonumber(string.sub(prior, 1, space - 1)) ~= quantity then
    return { 'idempotency_key_reused' }
  end
  local prior_rid = string.sub(prior, space + 1)
  local reply = view(sku_prefix(meta) .. 'r:' .. prior_rid, prior_rid, now)
  table.insert(reply, 1, 'replayed')
  return reply
end

local m = redis.call('HMGET', meta, 'available', 'per_user_limit', 'hold_ms', 'starts_at', 'ends_at')
if not m[1] then
  return { 'not_found' }
end
if m[4] ~= '' and now < tonumber(m[4]) then
  return { 'not_started' }
end
if m[5] ~= '' and now >= tonumber(m[5]) then
  return { 'ended' }
end
local already = tonumber(redis.call('HGET', used, user) or '0')
if already + quantity > tonumber(m[2]) then
  return { 'limit_exceeded' }
end
local available = tonumber(m[1])
if available < quantity then
  -- The sweeper may lag: give back what has expired before saying no.
  if expire_due(meta, used, deadlines, now, tonumber(ARGV[5])) > 0 then
    available = tonumber(redis.call('HGET', meta, 'available'))
  end
  if available < quantity then
    return { 'sold_out' }
  end
end

local expires_at = now + tonumber(m[3])
redis.call('HINCRBY', meta, 'available', -quantity)
redis.call('HINCRBY', meta, 'held', quantity)
redis.call('HINCRBY', used, user, quantity)
redis.call('HSET', rkey, 'user', user, 'quantity', quantity, 'status', 'held',
  'expires_at', expires_at, 'created_at', now)
redis.call('ZADD', deadlines, expires_at, rid)
redis.call('SET', idem_key, quantity .. ' ' .. rid, 'PX', ARGV[4])
return { 'created', rid, user, tostring(quantity), 'held', tostring(expires_at), tostring(now), '' }
