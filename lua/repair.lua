-- repair.lua: rebuild a SKU's counters from the truth the reconciler found.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:used   KEYS[3] fg:{sku}:deadlines
-- ARGV[1] stock_total (MySQL, the source of truth)
-- ARGV[2] sold floor: MySQL sold + confirmed events not yet flushed
-- ARGV[3] most due holds to expire first
-- ARGV[4] most live holds to recount; above that `held` is kept as it is (a recount
--         would keep Redis busy too long)
--
-- Reply: {'ok', stock_total, available, held, sold}
--        {'overcommitted', stock_total, available, held, sold}  held + sold > stock_total:
--            available is set to 0 so nothing more can be sold; operators must act
--        {'missing'}  no state in Redis (the caller reloads the SKU from MySQL)
--
-- Invariant restored: available + held + sold == stock_total, available >= 0, with
-- held recounted from the live holds and sold never below what MySQL has recorded.
-- MySQL wins for sales: sold only ever moves up here, so no unit is sold twice.
local meta, used, deadlines = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', meta) == 0 then
  return { 'missing' }
end
local now = now_ms()
expire_due(meta, used, deadlines, now, tonumber(ARGV[3]))

local held = tonumber(redis.call('HGET', meta, 'held') or '0')
if redis.call('ZCARD', deadlines) <= tonumber(ARGV[4]) then
  held = count_live_held(meta, deadlines, true)
end
local stock_total = tonumber(ARGV[1])
local sold = math.max(tonumber(redis.call('HGET', meta, 'sold') or '0'), tonumber(ARGV[2]))
local available = stock_total - held - sold
local code = 'ok'
if available < 0 then
  -- Cannot hold: take stock_total up to what is committed rather than break the
  -- equation, and sell nothing more.
  code = 'overcommitted'
  available = 0
  stock_total = held + sold
end
redis.call('HSET', meta, 'stock_total', stock_total, 'available', available, 'held', held, 'sold', sold)
return { code, stock_total, available, held, sold }
