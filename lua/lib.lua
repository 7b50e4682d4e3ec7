-- lib.lua: the reservation state machine shared by every script.
-- It is prepended to each script in lua/ at build time (see src/store.rs), so
-- every transition of a hold lives here, in one place, and runs atomically
-- inside whichever script calls it.
--
-- Key layout of one SKU (all share the hash tag {sku}, so one cluster slot):
--   fg:{sku}:meta        HASH   stock_total available held sold per_user_limit
--                                hold_ms starts_at ends_at (ms since epoch, '' = none)
--   fg:{sku}:used        HASH   user id -> held + paying + confirmed quantity
--   fg:{sku}:uholds      HASH   user id -> "rid rid ..": the user's live holds (an index
--                                to find them; a stale rid in it is skipped and pruned)
--   fg:{sku}:deadlines   ZSET   reservation id scored by expires_at (ms): live holds
--   fg:{sku}:outbox      STREAM events for the flush worker: confirmed, ended (cancelled /
--                                expired), compensation, compensation_resolved
--   fg:{sku}:comps       HASH   compensation id -> JSON record, until the flush wrote it
--   fg:{sku}:r:<rid>     HASH   one reservation: user quantity status expires_at
--                                created_at keep_until payment_ref
--                                comp:<payment_ref> -> compensation id
--   fg:{sku}:idem:<n>:<user>:<key>  STRING "<quantity> <rid>", TTL = key lifetime (below)
--   fg:{sku}:churn       HASH   user id -> "<holds released> <window end ms>": holds the
--                                user cancelled or let expire in the current window
--                                (the key lifetime), to cap what one account leaves
--                                behind (ended reservations and keys live that long)
--   fg:{sku}:rlog        LIST   "<quantity> <rid> <user>" per hold created while a
--                                reconciler check runs (meta `rlog_until`), see
--                                recon_begin.lua; gone when the check ends
--
-- A script that changes a sale declares the first eight of these as KEYS[1..8] (meta
-- used deadlines uholds outbox comps churn rlog, SkuKeys::sale), then its own (an
-- idempotency key, a reservation): on a cluster, only declared keys are checked before
-- a script runs. Reservations found through an index are read with read_indexed.
--
-- Invariant kept by every function below: available + held + sold == stock_total
-- and available >= 0; a live hold (held|paying) is counted in `held`, in `used`
-- and in `deadlines`, and leaves all three exactly once. Every end of a hold
-- (confirmed, cancelled, expired) appends its outbox event in the same step, so MySQL
-- records every reservation that ended.

-- An ended reservation's hash goes once the flush has written its end to MySQL
-- (Worker::flush_sku); until then it expires by itself no sooner than this (ms), even
-- when its idempotency key dies sooner (reads fall back to MySQL afterwards; until the
-- flush, the outbox holds the event).
local ENDED_KEEP_MIN_MS = 15 * 60 * 1000
-- Reservations written before `keep_until` existed: the old 8-day retention.
local LEGACY_KEEP_MS = 8 * 86400 * 1000

-- One clock decides every deadline: the Redis server's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- 'fg:{sku}:meta' -> 'fg:{sku}:'
local function sku_prefix(meta_key)
  return string.sub(meta_key, 1, #meta_key - 4)
end

-- 'fg:{sku}:' -> 'sku'
local function sku_of_prefix(prefix)
  return string.sub(prefix, 5, #prefix - 2)
end

local function is_live(status)
  return status == 'held' or status == 'paying'
end

-- Reads fields of a reservation found through an index (deadlines, uholds, an
-- idempotency key): a key the script could not declare. Nil when the key is not on
-- this node: on a cluster, the SKU's slot is migrating and this hash already moved.
-- Every caller reads before writing anything that depends on it, and on nil leaves
-- the hold alone (indexed, counted): a later call, after the migration, ends it. (A
-- plain redis.call would fail the script half-way, after some of its writes;
-- lua/check_keys.lua holds every script to this in the tests.)
local function read_indexed(rkey, ...)
  local r = redis.pcall('HMGET', rkey, ...)
  if r.err then
    return nil
  end
  return r
end

-- Removes `rid` from the user's live-hold index.
local function forget_user_hold(prefix, user, rid)
  local key = prefix .. 'uholds'
  local list = redis.call('HGET', key, user)
  if not list then
    return
  end
  local rest = {}
  for r in string.gmatch(list, '%S+') do
    if r ~= rid then
      rest[#rest + 1] = r
    end
  end
  if #rest == 0 then
    redis.call('HDEL', key, user)
  else
    redis.call('HSET', key, user, table.concat(rest, ' '))
  end
end

-- An ended reservation stays readable longer than the idempotency key that created it
-- can replay it (keep_until, set at creation; a second more, so the key always dies
-- first), and at least ENDED_KEEP_MIN_MS.
local function keep_ended(rkey, keep_until, now)
  local until_ms = (tonumber(keep_until or '') or (now + LEGACY_KEEP_MS)) + 1000
  redis.call('PEXPIREAT', rkey, string.format('%d', math.max(until_ms, now + ENDED_KEEP_MIN_MS)))
end

-- Appends the outbox event that records an ended reservation in MySQL.
-- `r` = {status, user, quantity, created_at, expires_at, payment_ref}
local function record_end(prefix, rid, r, now)
  redis.call('XADD', prefix .. 'outbox', '*', 'type', r[1] == 'confirmed' and 'confirmed' or 'ended',
    'reservation_id', rid, 'sku', sku_of_prefix(prefix), 'user_id', r[2], 'quantity', r[3],
    'status', r[1], 'payment_ref', r[6] or '', 'created_at', r[4], 'expires_at', r[5],
    'at', string.format('%d', now))
end

-- Counts one more hold the user released (cancelled or let expire) in the current
-- window, which starts with the first release and lasts one key lifetime (what an
-- ended reservation and its key stay in Redis).
local function count_release(prefix, user, window_ms, now)
  if not window_ms then
    return -- a reservation from before key lifetimes were recorded
  end
  local key = prefix .. 'churn'
  local entry = redis.call('HGET', key, user)
  local count, window_end = 0, now + window_ms
  if entry then
    local space = string.find(entry, ' ', 1, true)
    local ends = tonumber(string.sub(entry, space + 1))
    if now < ends then
      count, window_end = tonumber(string.sub(entry, 1, space - 1)), ends
    end
  end
  redis.call('HSET', key, user, string.format('%d %d', count + 1, window_end))
end

-- Whether the user released `cap` holds of the SKU in the current window (cap 0: never).
-- An entry whose window is over is dropped.
local function churn_capped(prefix, user, cap, now)
  if not cap or cap <= 0 then
    return false
  end
  local key = prefix .. 'churn'
  local entry = redis.call('HGET', key, user)
  if not entry then
    return false
  end
  local space = string.find(entry, ' ', 1, true)
  if now >= tonumber(string.sub(entry, space + 1)) then
    redis.call('HDEL', key, user)
    return false
  end
  return tonumber(string.sub(entry, 1, space - 1)) >= cap
end

-- Ends a live hold as `final_status` ('cancelled' or 'expired') and returns its
-- units to `available`. Returns false (and changes nothing) when it is not live,
-- which is what makes a release happen exactly once; nil (and changes nothing) when
-- its hash is not on this node (read_indexed).
local function release(meta, used, deadlines, rkey, rid, final_status, now)
  local r = read_indexed(rkey, 'status', 'user', 'quantity', 'created_at', 'expires_at',
    'payment_ref', 'keep_until')
  if not r then
    return nil
  end
  if not is_live(r[1]) then
    return false
  end
  local quantity = tonumber(r[3])
  redis.call('HSET', rkey, 'status', final_status, 'ended_at', string.format('%d', now))
  redis.call('HINCRBY', meta, 'held', -quantity)
  redis.call('HINCRBY', meta, 'available', quantity)
  if redis.call('HINCRBY', used, r[2], -quantity) <= 0 then
    redis.call('HDEL', used, r[2])
  end
  redis.call('ZREM', deadlines, rid)
  local prefix = sku_prefix(meta)
  forget_user_hold(prefix, r[2], rid)
  local keep_until = tonumber(r[7] or '')
  count_release(prefix, r[2], keep_until and (keep_until - tonumber(r[4])), now)
  r[1] = final_status
  record_end(prefix, rid, r, now)
  keep_ended(rkey, r[7], now)
  return true
end

-- Expires up to `limit` holds whose deadline has passed. Returns how many it expired
-- and how many index entries it looked at (stale ones are removed, not expired).
-- Stops at a hold whose hash is not on this node (a cluster slot migrating).
local function expire_due(meta, used, deadlines, now, limit)
  local due = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, limit)
  local prefix = sku_prefix(meta)
  local released, examined = 0, 0
  for _, rid in ipairs(due) do
    local done = release(meta, used, deadlines, prefix .. 'r:' .. rid, rid, 'expired', now)
    if done == nil then
      break
    end
    examined = examined + 1
    if done then
      released = released + 1
    else
      -- not live (or gone): it must not stay in the index of live holds
      redis.call('ZREM', deadlines, rid)
    end
  end
  return released, examined
end

-- Expires the user's own holds whose deadline has passed, however many other holds
-- are due: a hold past its deadline counts for nothing toward the user's limit.
-- Returns how many it expired.
local function expire_user_holds(meta, used, deadlines, user, now)
  local prefix = sku_prefix(meta)
  local list = redis.call('HGET', prefix .. 'uholds', user)
  if not list then
    return 0
  end
  local released = 0
  for rid in string.gmatch(list, '%S+') do
    local rkey = prefix .. 'r:' .. rid
    local r = read_indexed(rkey, 'status', 'expires_at')
    if not r then
      -- its hash moved (a cluster slot migrating): it stays counted until it is back
    elseif is_live(r[1]) then
      if now >= tonumber(r[2]) and release(meta, used, deadlines, rkey, rid, 'expired', now) then
        released = released + 1
      end
    else
      forget_user_hold(prefix, user, rid)
    end
  end
  return released
end

-- The status a caller sees: a live hold past its deadline is expired at once,
-- even before anything has returned its stock.
local function effective_status(status, expires_at, now)
  if is_live(status) and now >= tonumber(expires_at) then
    return 'expired'
  end
  return status
end

-- Reservation view: {rid, user, quantity, status, expires_at, created_at, payment_ref}
-- Nil when the hash is not on this node (read_indexed), false when there is none.
local function view(rkey, rid, now)
  local r = read_indexed(rkey, 'user', 'quantity', 'status', 'expires_at', 'created_at', 'payment_ref')
  if not r then
    return nil
  elseif not r[1] then
    return false
  end
  return { rid, r[1], r[2], effective_status(r[3], r[4], now), r[4], r[5], r[6] or '' }
end

-- Records one compensation per (reservation, payment_ref): its outbox event and a
-- readable record (fg:{sku}:comps, until the flush wrote it to MySQL), in the same
-- step. Returns the compensation id (the existing one on retries).
local function compensate(outbox, rkey, rid, sku, payment_ref, reason, new_id, now)
  local field = 'comp:' .. payment_ref
  local existing = redis.call('HGET', rkey, field)
  if existing then
    return existing
  end
  local r = redis.call('HMGET', rkey, 'user', 'quantity')
  local at = string.format('%d', now)
  redis.call('HSET', rkey, field, new_id)
  redis.call('XADD', outbox, '*', 'type', 'compensation', 'id', new_id, 'reservation_id', rid,
    'sku', sku, 'user_id', r[1], 'quantity', r[2], 'payment_ref', payment_ref,
    'reason', reason, 'at', at)
  local comps = string.sub(outbox, 1, #outbox - 6) .. 'comps'
  redis.call('HSET', comps, new_id, cjson.encode({ rid, r[1], r[2], payment_ref, reason, at, 'open' }))
  return new_id
end


-- The sale state of a SKU, read once per script call: reserve_hold counts holds into
-- it, save_sale writes it back in one HSET (a batch of 64 reserves pays one HMGET and
-- one HSET instead of one HMGET and two HINCRBY each). Nil when the SKU is not defined.
-- Deferring the write is safe: a script is atomic, and Redis refuses writes for OOM
-- only before a script's first write, never in the middle of one.
local function load_sale(meta)
  local m = redis.call('HMGET', meta, 'available', 'held', 'per_user_limit', 'hold_ms',
    'starts_at', 'ends_at', 'rlog_until')
  if not m[1] then
    return nil
  end
  return { available = tonumber(m[1]), held = tonumber(m[2] or '0'), limit = tonumber(m[3]),
    hold_ms = tonumber(m[4]), starts_at = m[5], ends_at = m[6], changed = false,
    log_until = tonumber(m[7]) }
end

-- Most entries the creation log of a reconciler check takes; past it the check
-- cannot be exact (it says so) and the log stops growing.
local RECON_LOG_MAX = 2000000

-- While a reconciler check runs (recon_begin.lua), every new hold is logged: the
-- check, reading the SKU in slices, tells holds that existed at its instant from
-- those made later. (Ends of holds need no log: each is an outbox event.)
local function log_creation(meta, sale, rid, quantity_text, user)
  local log = sku_prefix(meta) .. 'rlog'
  local n = redis.call('RPUSH', log, quantity_text .. ' ' .. rid .. ' ' .. user)
  if n == 1 then
    -- A check that died leaves no log behind.
    redis.call('PEXPIREAT', log, string.format('%d', sale.log_until + 60000))
  elseif n > RECON_LOG_MAX then
    redis.call('HSET', meta, 'rlog_until', '0', 'rlog_over', '1')
    sale.log_until = nil
  end
end

local function save_sale(meta, sale)
  if sale and sale.changed then
    redis.call('HSET', meta, 'available', string.format('%d', sale.available),
      'held', string.format('%d', sale.held))
    sale.changed = false
  end
end

-- Brings meta up to date, runs `reclaim` (which releases holds, counting in meta
-- itself), and reads the counters back into `sale`. Returns what reclaim returned.
local function reclaim_into(meta, sale, reclaim)
  save_sale(meta, sale)
  local released = reclaim()
  if released > 0 then
    local m = redis.call('HMGET', meta, 'available', 'held')
    sale.available, sale.held = tonumber(m[1]), tonumber(m[2])
  end
  return released
end

-- Takes a hold for one request, or says why not (the body of reserve.lua and
-- reserve_batch.lua). `sale` is load_sale(meta); the caller saves it afterwards.
-- Returns the reply of reserve.lua:
--   {'created', expires_at, created_at}   (the caller knows rid, user and quantity)
--   {'replayed', rid, user, quantity, status, expires_at, created_at, payment_ref}
--   {'forgotten', rid}: the key replays a reservation that ended and that only MySQL
--               keeps now (its hash goes once the flush wrote its end)
--   {'moving'}: the replayed reservation's hash is not on this node (a cluster slot
--               migrating; nothing was done, a retry after the migration answers)
--   or {refusal code}.
-- Numbers go to Redis as strings made with %d: Lua's own number-to-string conversion
-- is a float printf, a measurable share of Redis's time per reserve.
-- A rejection writes nothing but the reclaim of already expired holds; one idempotency
-- key creates at most one hold, and lives at least as long as that hold can be paid
-- (key_ttl_ms >= hold + payment grace); available never goes below 0.
local function reserve_hold(sale, meta, used, deadlines, idem_key, rkey, user, quantity, rid,
                            idem_ttl_ms, grace_ms, reclaim_limit, churn_cap, now)
  local prior = redis.call('GET', idem_key)
  if prior then
    local space = string.find(prior, ' ', 1, true)
    if tonumber(string.sub(prior, 1, space - 1)) ~= quantity then
      return { 'idempotency_key_reused' }
    end
    local prior_rid = string.sub(prior, space + 1)
    local reply = view(sku_prefix(meta) .. 'r:' .. prior_rid, prior_rid, now)
    if reply == nil then
      return { 'moving' } -- its reservation moved to another node: retry
    elseif not reply then
      -- It ended, MySQL has it and its hash went (the flush, Worker::flush_sku): the
      -- key still replays it, from MySQL's record.
      return { 'forgotten', prior_rid }
    end
    table.insert(reply, 1, 'replayed')
    return reply
  end

  if not sale then
    return { 'not_found' }
  end
  if sale.starts_at ~= '' and now < tonumber(sale.starts_at) then
    return { 'not_started' }
  end
  if sale.ends_at ~= '' and now >= tonumber(sale.ends_at) then
    return { 'ended' }
  end
  local already = tonumber(redis.call('HGET', used, user) or '0')
  if already + quantity > sale.limit and already > 0 then
    -- The user's own holds past their deadline count for nothing, swept or not.
    if reclaim_into(meta, sale, function()
          return expire_user_holds(meta, used, deadlines, user, now)
        end) > 0 then
      already = tonumber(redis.call('HGET', used, user) or '0')
    end
  end
  if already + quantity > sale.limit then
    return { 'limit_exceeded' }
  end
  -- What one account can leave behind per SKU and key lifetime is bounded.
  if churn_capped(sku_prefix(meta), user, churn_cap, now) then
    return { 'limit_exceeded' }
  end
  if sale.available < quantity then
    -- The sweeper may lag: give back what has expired before saying no.
    reclaim_into(meta, sale, function()
      return (expire_due(meta, used, deadlines, now, reclaim_limit))
    end)
    if sale.available < quantity then
      return { 'sold_out' }
    end
  end

  sale.available = sale.available - quantity
  sale.held = sale.held + quantity
  sale.changed = true
  local quantity_text = string.format('%d', quantity)
  local key_ttl_ms = math.max(tonumber(idem_ttl_ms), sale.hold_ms + tonumber(grace_ms))
  local expires_at = string.format('%d', now + sale.hold_ms)
  local created_at = string.format('%d', now)
  redis.call('HINCRBY', used, user, quantity_text)
  redis.call('HSET', rkey, 'user', user, 'quantity', quantity_text, 'status', 'held',
    'expires_at', expires_at, 'created_at', created_at,
    'keep_until', string.format('%d', now + key_ttl_ms))
  redis.call('ZADD', deadlines, expires_at, rid)
  local uholds = sku_prefix(meta) .. 'uholds'
  local holds = already > 0 and redis.call('HGET', uholds, user)
  redis.call('HSET', uholds, user, holds and (holds .. ' ' .. rid) or rid)
  redis.call('SET', idem_key, quantity_text .. ' ' .. rid, 'PX', string.format('%d', key_ttl_ms))
  if sale.log_until and now < sale.log_until then
    log_creation(meta, sale, rid, quantity_text, user)
  end
  return { 'created', expires_at, created_at }
end
