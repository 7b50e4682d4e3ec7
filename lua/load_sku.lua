-- load_sku.lua: create or redefine a SKU in Redis (admin PUT); held and sold carry over.
--
-- KEYS[1..9] the sale's keys (lib.lua, SkuKeys::sale): meta used deadlines uholds
--            outbox comps churn rlog holds
-- ARGV[1] stock_total   ARGV[2] per_user_limit   ARGV[3] hold_ms
-- ARGV[4] starts_at ms or ''   ARGV[5] ends_at ms or ''
-- ARGV[6] units sold according to MySQL, used only when Redis has no state for the SKU
-- ARGV[7] most due holds to expire before the check
-- ARGV[8] '1' to check only (write nothing but the expiry of due holds)
-- ARGV[9] buckets of the SKU (src/buckets.rs; '1' for an unsplit SKU), kept in meta
-- ARGV[10] '' to set stock_total to ARGV[1]; else a signed change of this bucket's
--          stock_total (a bucketed SKU's redefinition: transfers move stock between
--          buckets, so only a change can be applied, never a total); a bucket with
--          no state still takes ARGV[1]
-- ARGV[11] the SKU's stock_total over all its buckets (meta `sku_stock`, for the view)
-- ARGV[13] '1' paused by an operator, '0' not (meta `paused`, a term of sale)
-- KEYS[10..13] the waiting room's q:line q:admits q:used q:state (queue.lua)
-- ARGV[14] the waiting room's admission_seconds in ms, '' for none (queue.lua): without
--          one, a waiting room the SKU had is deleted with its line and admissions
-- ARGV[15] its admit_per_second (0: as fast as stock allows)   ARGV[16] '1': shuffle the
--          pre-queue
-- ARGV[12] '1': the sale must have state (a change to an existing bucket of a split SKU;
--          a lost one is rebuilt only with the SKU's other lost buckets, from MySQL)
-- KEYS[14] fg:{sku}:restored   ARGV[17] '1': the caller restored the buyers' usage before
--          (restore_usage.lua) wherever Redis had no live sale when it looked; a sale this
--          load creates must find the marker that restore left (a sale lost since the
--          restore, or since a look that found it live, has none); a load that creates or
--          reopens takes it (also when it then refuses the stock below; not on a check,
--          ARGV[8])
--
-- Replies: {'ok', stock_total, available, held, sold}       redefined (or would be)
--          {'created', stock_total, available, held, sold}  Redis had no state for it
--          {'reopened', stock_total, available, held, sold} it was retired (sweep.lua):
--                 back on sale; its per-user usage may have gone with it (the caller
--                 restores what is missing)
--          {'stock_below_committed', held, sold}   nothing written
--          {'missing'}  ARGV[12] is '1' and Redis has no state for it, or ARGV[17] is
--                 '1', Redis has no state for it and no restore's marker (Redis lost the
--                 sale since the caller's restore or look): nothing written
--
-- Invariant: available = stock_total - held - sold >= 0 after every write; holds past
-- their deadline are expired first, so they never count as committed; a waiting room's
-- unused admissions never exceed available (the newest are revoked).
local K = sale_keys()
local meta = K.meta

-- Admissions wait while nobody may use them: from a pause, or from a start moved later
-- than now after the sale had started, until the sale is open again, when the first
-- script to see it open moves their deadlines on by that time (lib.lua thaw_admissions).
local function freeze_admissions(was_paused, paused, starts_at, now)
  local state = KEYS[13]
  local stopped = (paused and not was_paused)
    or (starts_at ~= '' and tonumber(starts_at) > now
      and redis.call('HGET', state, 'started') == '1')
  if stopped then
    redis.call('HSETNX', state, 'frozen_at', string.format('%d', now))
  end
end

-- Less stock than the admissions not yet used: the newest of them are revoked (their
-- tickets say closed, lapsed), so no unit is ever promised twice (queue.lua).
local function revoke_admissions(available, now)
  local admits = KEYS[11]
  -- While the sale stands still, the admissions unused when it stopped are still owed
  -- (lib.lua thaw_admissions gives them their time back).
  local since = redis.call('HGET', KEYS[13], 'frozen_at') or string.format('%d', now)
  local over = redis.call('ZCOUNT', admits, '(' .. since, '+inf') - available
  if over > 0 then
    redis.call('ZREM', admits, unpack(redis.call('ZRANGE', admits, -over, -1)))
  end
end

local stock_total = tonumber(ARGV[1])
if redis.call('EXISTS', meta) == 1 then
  expire_due(K, now_ms(), tonumber(ARGV[7]))
end
local m = redis.call('HMGET', meta, 'held', 'sold', 'retired', 'stock_total', 'paused', 'wr_ms')
local created = not m[2]
if created and ARGV[12] == '1' then
  return { 'missing' }
end
local reopened = m[3] and true or false
if (created or reopened) and ARGV[17] == '1' and ARGV[8] ~= '1' then
  -- A retired sale keeps its usage records (sweep.lua): only one Redis lost needs them
  -- restored, and a loss takes the marker with them.
  local restored = redis.call('DEL', KEYS[14]) == 1
  if created and not restored then
    return { 'missing' }
  end
end
if ARGV[10] ~= '' and m[4] then
  stock_total = tonumber(m[4]) + tonumber(ARGV[10])
end
local held, sold = tonumber(m[1] or '0'), tonumber(m[2] or ARGV[6])
if stock_total < held + sold then
  return { 'stock_below_committed', held, sold }
end
local available = stock_total - held - sold
if ARGV[8] ~= '1' then
  redis.call('HSET', meta, 'stock_total', stock_total, 'available', available, 'held', held,
    'sold', sold, 'per_user_limit', ARGV[2], 'hold_ms', ARGV[3], 'starts_at', ARGV[4],
    'ends_at', ARGV[5], 'buckets', ARGV[9], 'sku_stock', ARGV[11], 'paused', ARGV[13] or '0')
  if (ARGV[14] or '') ~= '' then
    redis.call('HSET', meta, 'wr_ms', ARGV[14], 'wr_rate', ARGV[15], 'wr_shuffle', ARGV[16])
    freeze_admissions(m[5] == '1', (ARGV[13] or '0') == '1', ARGV[4], now_ms())
    revoke_admissions(available, now_ms())
  else
    redis.call('HDEL', meta, 'wr_ms', 'wr_rate', 'wr_shuffle')
    if m[6] then
      -- The waiting room is removed: its line and its admissions end with it (a later
      -- one starts from an empty line; no admission of this one is ever spent there).
      redis.call('DEL', KEYS[10], KEYS[11], KEYS[12], KEYS[13])
    end
  end
  if created then
    -- A new SKU has no layout-1 keys to look for (lib.lua).
    redis.call('HSET', meta, 'layout', '2')
  end
  if reopened then
    -- The tombstone is a sale again: no expiry, no retirement mark.
    redis.call('HDEL', meta, 'retired')
    redis.call('PERSIST', meta)
  end
  -- Usage records a retirement kept are the sale's again.
  redis.call('PERSIST', K.used)
  -- More or less stock may cross zero: sku.sold_out / sku.available (lib.lua).
  announce_stock(K, now_ms())
end
local code = (created and 'created') or (reopened and 'reopened') or 'ok'
return { code, stock_total, available, held, sold }
