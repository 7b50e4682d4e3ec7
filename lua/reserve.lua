-- reserve.lua: take a hold on a SKU for one user, or say why not.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- KEYS[10] fg:{sku}:idem:<n>:<user>:<key> (layout 1's idempotency key, read only for a
--          layout-1 SKU)
-- KEYS[11] fg:{sku}:q:admits   KEYS[12] fg:{sku}:q:used   KEYS[13] fg:{sku}:q:state
--          (the waiting room, queue.lua)
-- ARGV[1] user id   ARGV[2] quantity (>= 1)   ARGV[3] new reservation id
-- ARGV[4] idempotency key   ARGV[5] idempotency TTL (ms)   ARGV[6] payment grace (ms)
-- ARGV[7] expired holds to reclaim before sold_out
-- ARGV[8] holds a user may release per key lifetime before `limit_exceeded` (0: no cap)
-- ARGV[9] '1' when the caller routed the request without knowing the SKU's bucket count
--         (Redis had no state for the SKU): then a SKU split over buckets answers
--         {'split'} and nothing is done (its users have home buckets, src/buckets.rs)
-- ARGV[10] '1' when the gateway checked an admission token of this user and SKU
--          (src/queue.rs): a SKU with a waiting room then spends the user's admission;
--          '2' when that token's deadline had passed: it may only replay its key
--
-- Replies:
--   {'created', expires_at, created_at}   a new hold: rid, user, quantity as asked, status held
--   {'replayed', rid, user, quantity, status, expires_at, created_at, payment_ref}
--   {'forgotten', rid}   {'moving'}   (see reserve_hold in lib.lua)
--   {'idempotency_key_reused'} {'not_found'} {'not_started'} {'ended'}
--   {'limit_exceeded'} {'sold_out'}
--   {'admission_required'} {'admission_used'}   (a SKU with a waiting room)
--
-- Invariants (see reserve_hold in lib.lua): a rejection writes nothing but the reclaim
-- of already expired holds; the user's own expired holds never count toward the limit;
-- one idempotency key creates at most one hold and replays it at least as long as it
-- could be paid (max(idempotency TTL, hold + grace)); available never goes below 0; on
-- a SKU with a waiting room one admission makes at most one hold, and the units promised
-- to other admitted users stay available for them.
local K = sale_keys()
if ARGV[9] == '1' and tonumber(redis.call('HGET', K.meta, 'buckets') or '1') > 1 then
  return { 'split' }
end
local sale = load_sale(K.meta)
local queue = nil
if ARGV[10] == '1' or ARGV[10] == '2' then
  queue = { admits = KEYS[11], used = KEYS[12], state = KEYS[13], replay_only = ARGV[10] == '2' }
end
local reply = reserve_hold(K, sale, KEYS[10], ARGV[1], ARGV[4], tonumber(ARGV[2]), ARGV[3],
  ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), now_ms(), queue)
save_sale(K, sale)
return reply
