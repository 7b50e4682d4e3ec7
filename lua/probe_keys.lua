-- probe_keys.lua: whether idempotency keys of a SKU made a hold (the sold-out fast
-- path asks before it answers `sold_out`: a key that made a hold must replay). Writes
-- nothing.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:used
-- then for probe i: KEYS[2 + i] fg:{sku}:idem:<n>:<user>:<key> (layout 1's key)
-- ARGV[2i - 1] user id   ARGV[2i] idempotency key
--
-- Reply: 1 or 0 per probe, in order.
local K = { used = KEYS[2] }
local now = now_ms()
local legacy = redis.call('HGET', KEYS[1], 'layout') ~= '2'
local found = {}
for i = 1, #KEYS - 2 do
  local user, key = ARGV[2 * i - 1], ARGV[2 * i]
  found[i] = find_claim(load_usage(K, user), key, now) and 1 or 0
  if found[i] == 0 and legacy and redis.call('EXISTS', KEYS[2 + i]) == 1 then
    found[i] = 1
  end
end
return found
