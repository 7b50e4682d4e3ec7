-- reserve.lua: take a hold on a SKU for one user, or say why not.
--
-- KEYS[1..8] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog
-- KEYS[9] fg:{sku}:idem:<n>:<user>:<key>   KEYS[10] fg:{sku}:r:<new rid>
-- ARGV[1] user id   ARGV[2] quantity (>= 1)   ARGV[3] new reservation id
-- ARGV[4] idempotency TTL (ms)   ARGV[5] payment grace (ms)
-- ARGV[6] expired holds to reclaim before sold_out
-- ARGV[7] holds a user may release per key lifetime before `limit_exceeded` (0: no cap)
--
-- Replies:
--   {'created', expires_at, created_at}   a new hold: rid, user, quantity as asked, status held
--   {'replayed', rid, user, quantity, status, expires_at, created_at, payment_ref}
--   {'idempotency_key_reused'} {'not_found'} {'not_started'} {'ended'}
--   {'limit_exceeded'} {'sold_out'}
--
-- Invariants (see reserve_hold in lib.lua): a rejection writes nothing but the reclaim
-- of already expired holds; the user's own expired holds never count toward the limit;
-- one idempotency key creates at most one hold and outlives every hold it could
-- replay (max(idempotency TTL, hold + grace)); available never goes below 0.
local sale = load_sale(KEYS[1])
local reply = reserve_hold(sale, KEYS[1], KEYS[2], KEYS[3], KEYS[9], KEYS[10], ARGV[1],
  tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), now_ms())
save_sale(KEYS[1], sale)
return reply
