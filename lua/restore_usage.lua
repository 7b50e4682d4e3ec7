-- restore_usage.lua: put back what a rebuild of a sale Redis lost takes from MySQL into
-- the per-user usage records: the units each user bought (the per-user limit counts
-- them) and the claims of the idempotency keys whose ended reservations MySQL records
-- (so each key replays its reservation for its lifetime, contract invariant 3).
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale)
-- KEYS[10] fg:{sku}:restored, the marker a restore before a load leaves for the load
-- ARGV[1] n: users with units, then n pairs: user, units bought
-- then groups of five, one per claim: user, idempotency key, reservation tail, quantity,
--      keep_until (ms)
--
-- ARGV[last] '1' on the first call of a restore, '0' on the calls that go on with it
--
-- Reply: the number of claims restored; -1 when a call that goes on with a restore into a
-- sale Redis has no live state for finds the marker gone (Redis lost what the earlier
-- calls wrote: the caller starts over).
--
-- Called by a rebuild before it loads the sale (a reserve that finds the sale finds the
-- usage with it: no second hold for a restored key, no limit passed in between), and
-- after, to keep the sale's `claims_until` (which needs the sale's meta).
--
-- Invariant: never overwrites what Redis has: a user's units are set only where Redis
-- has no usage record, and a claim is added only for a key the user does not claim
-- already (one key, at most one hold). A restored claim is ended ('-'): it replays the
-- reservation from MySQL's record ('forgotten') and never counts as a live hold. Into a
-- sale without live state (lost, or retired) the restore's first call leaves the marker,
-- each later call finds it and gives it 60 s more, and the load that follows takes it
-- (load_sku.lua ARGV[17]): if Redis loses the sale in between, the marker goes with the
-- usage and the load refuses to create the sale without it (a reserve would find no
-- claim for a key MySQL records: a second hold). Not covered: Redis going back to a
-- snapshot taken between two calls of one restore (the marker of the first call stays,
-- the later calls' writes go).
local K = sale_keys()
local now = now_ms()
local marker, first = KEYS[10], table.remove(ARGV) == '1'
local live = redis.call('HMGET', K.meta, 'sold', 'retired')
if not live[1] or live[2] then
  if first then
    redis.call('SET', marker, '1', 'PX', 60000)
  elseif redis.call('PEXPIRE', marker, 60000) == 0 then
    return -1
  end
end
-- Usage records a retirement left to expire (sweep.lua) live a minute more: the load
-- that follows takes them back (load_sku.lua); expiring between this call, which finds
-- them and writes nothing, and that load, they would leave the reopened sale without
-- its buyers' units.
local ttl = redis.call('PTTL', K.used)
if ttl >= 0 and ttl < 60000 then
  redis.call('PEXPIRE', K.used, 60000)
end
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local user, units = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if redis.call('HEXISTS', K.used, user) == 0 then
    redis.call('HSET', K.used, user, units .. ' 0 0')
  end
end
local restored, claims_until = 0, 0
for at = 2 + 2 * n, #ARGV, 5 do
  local user, key, tail, quantity, keep_until =
    ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], tonumber(ARGV[at + 4])
  if keep_until > now then
    claims_until = math.max(claims_until, keep_until)
    local u = load_usage(K, user)
    if not find_claim(u, key, now) then
      u.claims = u.claims .. ' ' .. key .. '|-' .. tail .. ':' .. quantity .. ':' .. ms(keep_until)
      save_usage(K, u, now)
      restored = restored + 1
    end
  end
end
-- A retired sale keeps its usage records while any claim still replays (sweep.lua).
-- Only on a sale that exists: a rebuild restores usage before it loads the sale (so no
-- reserve sees the sale without it), then once more after, for this.
local current = redis.call('HMGET', K.meta, 'stock_total', 'claims_until')
if current[1] and claims_until > tonumber(current[2] or '0') then
  redis.call('HSET', K.meta, 'claims_until', ms(claims_until))
end
return restored
