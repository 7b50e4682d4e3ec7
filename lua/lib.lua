-- lib.lua: the reservation state machine shared by every script.
-- With every script it makes one Redis function library (src/lua.rs), so
-- every transition of a hold lives here, in one place, and runs atomically
-- inside whichever script calls it.
--
-- Key layout of one SKU (all share the hash tag {sku}, so one cluster slot):
--   fg:{sku}:meta        HASH   stock_total available held sold per_user_limit
--                                hold_ms starts_at ends_at (ms since epoch, '' = none),
--                                layout ('2' for a SKU created with this layout),
--                                paused ('1' while an operator paused its sale),
--                                sold_out ('1' between the outbox's sku_sold_out and
--                                the next sku_available, announce_stock),
--                                giving (a bucket's transfers taken and not done yet,
--                                transfer_take.lua / transfer_done.lua)
--   fg:{sku}:holds       HASH   reservation tail -> hold record (below), from its creation
--                                until the flush has written its end to MySQL
--   fg:{sku}:used        HASH   user id -> usage record (below)
--   fg:{sku}:deadlines   ZSET   reservation tail scored by expires_at (ms): live holds
--   fg:{sku}:outbox      STREAM events for the flush worker: confirmed, ended (cancelled /
--                                expired), compensation, compensation_resolved,
--                                sku_sold_out, sku_available (announce_stock)
--   fg:{sku}:comps       HASH   compensation id -> JSON record, until the flush wrote it
--   fg:{sku}:rlog        LIST   "<quantity> <rid> <user>" per hold created while a
--                                reconciler check runs (meta `rlog_until`), see
--                                recon_begin.lua; gone when the check ends
--   fg:{sku}:q:*         the waiting room (meta `wr_ms` set), queue.lua: a reserve
--                                needs an unused admission (admission_of)
--
-- A reservation id is "<base64url(sku)>.<tail>"; Redis keeps only the tail (27 chars),
-- the head is the SKU's (rid_head).
--
-- Hold record (one string, so a hold costs one hash entry, not a key of its own):
--   "<status> <quantity> <created_at> <expires_at> <keep_until> <payment> <n> <comp>... <user>"
--   status held|paying|confirmed|cancelled|expired; payment '=' .. payment_ref or '-';
--   n compensations, each "<compensation id>=<payment_ref>"; the user id last (it may
--   hold spaces). keep_until: when the idempotency key that made it stops replaying it.
-- Usage record of one user (what the per-user limit, the idempotency keys and the
-- churn cap need, read and written once per reserve):
--   "<units> <released> <window_end> <claim>..."
--   units: held + paying + confirmed quantity; released: holds the user cancelled or
--   let expire in the window that ends at window_end (the churn cap); a claim per
--   idempotency key of the user: "<key>|<+|-><tail>:<quantity>:<keep_until>", '+' while
--   its hold is live, '-' once it ended; an ended claim is dropped after keep_until.
--   A bare "<units>" (older records) reads as units with nothing else.
--
-- Layout 1 (SKUs created before layout 2; read, and moved on write): a hash
-- fg:{sku}:r:<rid> per reservation, fg:{sku}:uholds (user -> "rid rid .."),
-- fg:{sku}:churn, and a key fg:{sku}:idem:<n>:<user>:<key> = "<quantity> <rid>" per
-- idempotency key. A layout-1 hold is moved into `holds` by its next transition.
--
-- A script that changes a sale declares the first nine keys as KEYS[1..9] (meta used
-- deadlines uholds outbox comps churn rlog holds, SkuKeys::sale), then its own: on a
-- cluster, only declared keys are checked before a script runs. Layout-1 hashes found
-- through an index are read with redis.pcall (load_hold).
--
-- Invariant kept by every function below: available + held + sold == stock_total
-- and available >= 0; a live hold (held|paying) is counted in `held`, in its user's
-- units and in `deadlines`, and leaves all three exactly once. Every end of a hold
-- (confirmed, cancelled, expired) appends its outbox event in the same step, so MySQL
-- records every reservation that ended.

-- One clock decides every deadline: the Redis server's.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- 'fg:{sku}:meta' -> 'fg:{sku}:'
local function sku_prefix(meta_key)
  return string.sub(meta_key, 1, #meta_key - 4)
end

-- 'fg:{sku}:' -> 'sku', and a bucket's 'fg:{sku~b~n}:' -> 'sku' (src/buckets.rs)
local function sku_of_prefix(prefix)
  return string.match(string.sub(prefix, 5, #prefix - 2), '^[^~]*')
end

local function is_live(status)
  return status == 'held' or status == 'paying'
end

local function ms(n)
  return string.format('%d', n)
end

-- The sale's keys, as declared first by every script that changes a sale.
local function sale_keys()
  return { meta = KEYS[1], used = KEYS[2], deadlines = KEYS[3], uholds = KEYS[4],
    outbox = KEYS[5], comps = KEYS[6], churn = KEYS[7], rlog = KEYS[8], holds = KEYS[9],
    prefix = sku_prefix(KEYS[1]) }
end

local BASE64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'

-- base64url(sku) without padding, as src/ids.rs writes it, then a bucket's '~b~n':
-- the head of the reservation ids of this sale. Computed once per script call.
local function rid_head(K)
  if not K.head then
    local sku, out = sku_of_prefix(K.prefix), {}
    for i = 1, #sku, 3 do
      local a, b, c = string.byte(sku, i, i + 2)
      local n = a * 65536 + (b or 0) * 256 + (c or 0)
      local chars = c and 4 or (b and 3 or 2)
      for j = 1, chars do
        local v = math.floor(n / 2 ^ (18 - 6 * (j - 1))) % 64
        out[#out + 1] = string.sub(BASE64URL, v + 1, v + 1)
      end
    end
    local tag = string.sub(K.prefix, 5, #K.prefix - 2)
    K.head = table.concat(out) .. string.sub(tag, #sku + 1)
  end
  return K.head
end

-- 'head.tail' -> 'tail' (a tail stays itself)
local function tail_of(id)
  local dot = string.find(id, '.', 1, true)
  return dot and string.sub(id, dot + 1) or id
end

-- The error a script answers when the reservation it was called for is a layout-1
-- hash already moved (redis-rs retries TRYAGAIN).
local MOVING_REPLY = 'TRYAGAIN a reservation of this SKU is moving to another node'

-- Hold records ------------------------------------------------------------------------

local function parse_hold(raw, tail)
  local status, quantity, created_at, expires_at, keep_until, payment, n, rest =
    string.match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%d+) (.*)$')
  local h = { tail = tail, status = status, quantity = quantity, created_at = created_at,
    expires_at = expires_at, keep_until = keep_until, comps = {},
    payment_ref = payment ~= '-' and string.sub(payment, 2) or nil }
  for i = 1, tonumber(n) do
    local space = string.find(rest, ' ', 1, true)
    h.comps[i] = string.sub(rest, 1, space - 1)
    rest = string.sub(rest, space + 1)
  end
  h.user = rest
  return h
end

local function format_hold(h)
  local parts = { h.status, h.quantity, h.created_at, h.expires_at, h.keep_until,
    h.payment_ref and ('=' .. h.payment_ref) or '-', ms(#h.comps) }
  for _, comp in ipairs(h.comps) do
    parts[#parts + 1] = comp
  end
  parts[#parts + 1] = h.user
  return table.concat(parts, ' ')
end

-- The hold a reservation id (or a tail from an index) names: a table; false when there
-- is none (never made, or ended and forgotten once MySQL had it); nil when it is a
-- layout-1 hash that is not on this node. Such a hash is a key the script could not
-- declare: on a cluster whose SKU slot is migrating it may have moved already, so it
-- is read with redis.pcall before anything that depends on it, and on nil the caller
-- leaves the hold alone (indexed, counted) for a call after the migration. (A plain
-- redis.call would fail the script half-way, after some of its writes;
-- lua/check_keys.lua holds every script to this in the tests.)
local function load_hold(K, id)
  local tail = tail_of(id)
  local raw = redis.call('HGET', K.holds, tail)
  if raw then
    return parse_hold(raw, tail)
  elseif tail == id then
    return false
  end
  local legacy_key = K.prefix .. 'r:' .. id
  local r = redis.pcall('HGETALL', legacy_key)
  if r.err then
    return nil
  elseif #r == 0 then
    return false
  end
  local f = {}
  for i = 1, #r, 2 do
    f[r[i]] = r[i + 1]
  end
  local h = { tail = tail, status = f.status, quantity = f.quantity, created_at = f.created_at,
    expires_at = f.expires_at, keep_until = f.keep_until or '0', payment_ref = f.payment_ref,
    user = f.user, comps = {}, legacy_key = legacy_key, legacy_rid = id }
  for i = 1, #r, 2 do
    if string.sub(r[i], 1, 5) == 'comp:' then
      h.comps[#h.comps + 1] = r[i + 1] .. '=' .. string.sub(r[i], 6)
    end
  end
  return h
end

-- Layout 1: removes `rid` from the user's live-hold index.
local function forget_user_hold(K, user, rid)
  local list = redis.call('HGET', K.uholds, user)
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
    redis.call('HDEL', K.uholds, user)
  else
    redis.call('HSET', K.uholds, user, table.concat(rest, ' '))
  end
end

-- Writes a hold record. A layout-1 hold moves into `holds` here: its hash goes and
-- its index entries take the tail.
local function store_hold(K, h)
  redis.call('HSET', K.holds, h.tail, format_hold(h))
  if h.legacy_key then
    redis.call('DEL', h.legacy_key)
    redis.call('ZREM', K.deadlines, h.legacy_rid)
    if is_live(h.status) then
      redis.call('ZADD', K.deadlines, h.expires_at, h.tail)
    end
    forget_user_hold(K, h.user, h.legacy_rid)
    h.legacy_key = nil
  end
end

-- Usage records -----------------------------------------------------------------------
-- A record is read and written as a string, its claims never split into Lua tables on
-- the reserve path: a user with dozens of live holds costs a few string searches in C,
-- not dozens of Lua parses per reserve.

local function load_usage(K, user)
  local raw = redis.call('HGET', K.used, user)
  local u = { user = user, units = 0, released = 0, window_end = 0, claims = '' }
  if not raw then
    return u
  end
  local units, released, window_end, claims = string.match(raw, '^(%S+) (%S+) (%S+)(.*)$')
  if units then
    u.units, u.released, u.window_end, u.claims =
      tonumber(units), tonumber(released), tonumber(window_end), claims
  else
    u.units = tonumber(raw) -- a bare count (older records)
  end
  return u
end

-- The claim of idempotency key `key` in `u`, if it still replays at `now`:
-- {live, tail, quantity, keep_until}. A claim is " <key>|<+|-><tail>:<quantity>:<keep_until>":
-- keys hold no space, so " <key>|" only matches where a claim starts; the rest of the
-- token must then be the suffix (no '|' in it), which tells a key "a" from a key "a|b".
local function find_claim(u, key, now)
  local needle, from = ' ' .. key .. '|', 1
  while true do
    local at = string.find(u.claims, needle, from, true)
    if not at then
      return nil
    end
    local mark, tail, quantity, keep_until =
      string.match(u.claims, '^([+-])([%w_-]+):(%d+):(%d+)', at + #needle)
    local after = at + #needle + (mark and (#tail + #quantity + #keep_until + 3) or 0)
    if mark and (after > #u.claims or string.sub(u.claims, after, after) == ' ') then
      keep_until = tonumber(keep_until)
      if mark == '+' or now < keep_until then
        return { live = mark == '+', tail = tail, quantity = tonumber(quantity),
          keep_until = keep_until }
      end
      -- an ended claim past its time (dropped at the user's next end of a hold): the
      -- key may have made a newer hold since
    end
    from = at + 1
  end
end

local function add_claim(u, key, tail, quantity, keep_until)
  u.claims = u.claims .. ' ' .. key .. '|+' .. tail .. ':' .. ms(quantity) .. ':' .. ms(keep_until)
end

-- The tails of the user's live holds. (A claim's suffix follows the last '|' of its
-- token: a key may hold '|', the suffix never does.)
local function live_claims(u)
  local tails = {}
  for token in string.gmatch(u.claims, '%S+') do
    local tail = string.match(token, '|%+([%w_-]+):%d+:%d+$')
    if tail then
      tails[#tails + 1] = tail
    end
  end
  return tails
end

-- The hold `tail` ended: its claim now only replays the key until its keep_until; the
-- ended claims whose time is over are dropped (on the release path, not the reserve's).
-- Returns the idempotency key of the hold (nil for a layout-1 hold, which has no claim).
local function end_claim(u, tail, now)
  local ended
  u.claims = (string.gsub(u.claims, ' (%S+)', function(token)
    local key, mark, t, rest, keep_until =
      string.match(token, '^(.*)|([+-])([%w_-]+)(:%d+:(%d+))$')
    if not key then
      return nil
    elseif mark == '+' and t == tail then
      ended = key
      return ' ' .. key .. '|-' .. t .. rest
    elseif mark == '-' and now >= tonumber(keep_until) then
      return ''
    end
  end))
  return ended
end

-- Writes a usage record back; a record left with nothing in it goes.
local function save_usage(K, u, now)
  if u.units <= 0 and u.claims == '' and now >= u.window_end then
    redis.call('HDEL', K.used, u.user)
  else
    redis.call('HSET', K.used, u.user, ms(math.max(u.units, 0)) .. ' ' .. ms(u.released) .. ' '
      .. ms(u.window_end) .. u.claims)
  end
end

-- Counts one more hold the user released (cancelled or let expire) in the current
-- window, which starts with the first release and lasts one key lifetime (what the
-- claim of an ended hold stays).
local function count_release(u, window_ms, now)
  if window_ms <= 0 then
    return -- a layout-1 reservation from before key lifetimes were recorded
  end
  if now >= u.window_end then
    u.released, u.window_end = 0, now + window_ms
  end
  u.released = u.released + 1
end

-- Whether the user released `cap` holds of the SKU in the current window (cap 0: never).
-- The count of a window that is over is dropped (with the record's next write).
local function churn_capped(u, cap, now)
  if now >= u.window_end then
    u.released, u.window_end = 0, 0
  end
  return cap and cap > 0 and u.released >= cap
end

-- Transitions -------------------------------------------------------------------------

local function full_rid(K, h)
  return rid_head(K) .. '.' .. h.tail
end

-- Appends the outbox event that records an ended reservation in MySQL, with the
-- idempotency key that made it (`key`, end_claim's answer) and how long that key
-- replays it: after Redis loses the SKU, the rebuild restores the claim from MySQL.
local function record_end(K, h, key, now)
  redis.call('XADD', K.outbox, '*', 'type', h.status == 'confirmed' and 'confirmed' or 'ended',
    'reservation_id', full_rid(K, h), 'sku', sku_of_prefix(K.prefix), 'user_id', h.user,
    'quantity', h.quantity, 'status', h.status, 'payment_ref', h.payment_ref or '',
    'created_at', h.created_at, 'expires_at', h.expires_at, 'at', ms(now),
    'idempotency_key', key or '', 'keep_until', h.keep_until or '0')
end

-- sku.sold_out / sku.available (src/events.rs): the script whose write makes `available`
-- reach 0 appends 'sku_sold_out' to the outbox, the one that brings it back above 0
-- after that appends 'sku_available'; meta `sold_out` ('1' from the one to the other)
-- pairs them, so each is appended once per crossing. Callers call it only when a
-- crossing may have happened (available 0 after a reserve wrote it, or 0 before a
-- release, a transfer's end): a write that leaves stock on both sides costs nothing
-- more. A bucket of a SKU split over buckets (src/buckets.rs) announces its own
-- crossings, each with its hash tag (`sale`): one bucket's stock is not the SKU's, so
-- the flush makes them the SKU's events (sold out once every bucket is out, back when
-- one is back: db::apply_events_in_order). Units a bucket gave that are on their way to
-- another (meta `giving`: its transfers taken and not done) are still the SKU's: the
-- bucket is not out until the transfer ends (transfer_done.lua).
local function announce_stock(K, now)
  local m = redis.call('HMGET', K.meta, 'available', 'sold_out', 'buckets', 'stock_total',
    'held', 'sold', 'giving')
  if not m[1] then
    return
  end
  local out = tonumber(m[1]) == 0 and tonumber(m[7] or '0') <= 0
  if out == (m[2] == '1') then
    return
  end
  if out then
    redis.call('HSET', K.meta, 'sold_out', '1')
  else
    redis.call('HDEL', K.meta, 'sold_out')
  end
  redis.call('XADD', K.outbox, '*', 'type', out and 'sku_sold_out' or 'sku_available',
    'sku', sku_of_prefix(K.prefix), 'sale', string.sub(K.prefix, 5, #K.prefix - 2),
    'stock_total', m[4], 'available', m[1], 'held', m[5] or '0', 'sold', m[6] or '0',
    'at', ms(now))
end

-- Ends a live hold `h` as `final_status` ('cancelled' or 'expired') and returns its
-- units to `available`. Callers check that it is live: that check and this write in
-- one script are what make a release happen exactly once.
local function release(K, h, final_status, now)
  local quantity = tonumber(h.quantity)
  h.status = final_status
  store_hold(K, h)
  redis.call('HINCRBY', K.meta, 'held', -quantity)
  if redis.call('HINCRBY', K.meta, 'available', quantity) == quantity then
    announce_stock(K, now) -- it was 0
  end
  redis.call('ZREM', K.deadlines, h.tail)
  local u = load_usage(K, h.user)
  u.units = u.units - quantity
  local key = end_claim(u, h.tail, now)
  local keep_until = tonumber(h.keep_until)
  if keep_until > 0 then
    count_release(u, keep_until - tonumber(h.created_at), now)
  end
  save_usage(K, u, now)
  record_end(K, h, key, now)
end

-- Expires up to `limit` holds whose deadline has passed. Returns how many it expired
-- and how many index entries it looked at (stale ones are removed, not expired).
-- Stops at a layout-1 hold whose hash is not on this node (a cluster slot migrating).
local function expire_due(K, now, limit)
  local due = redis.call('ZRANGEBYSCORE', K.deadlines, '-inf', now, 'LIMIT', 0, limit)
  local released, examined = 0, 0
  for _, member in ipairs(due) do
    local h = load_hold(K, member)
    if h == nil then
      break
    end
    examined = examined + 1
    if h and is_live(h.status) then
      release(K, h, 'expired', now)
      released = released + 1
    else
      -- not live (or gone): it must not stay in the index of live holds
      redis.call('ZREM', K.deadlines, member)
    end
  end
  return released, examined
end

-- Expires the user's own holds whose deadline has passed, however many other holds
-- are due: a hold past its deadline counts for nothing toward the user's limit.
-- Returns how many it expired.
local function expire_user_holds(K, sale, user, now)
  local released = 0
  local function expire(id)
    local h = load_hold(K, id)
    if h and is_live(h.status) and now >= tonumber(h.expires_at) then
      release(K, h, 'expired', now)
      released = released + 1
    end
    return h
  end
  for _, tail in ipairs(live_claims(load_usage(K, user))) do
    expire(tail)
  end
  if sale.legacy then
    local list = redis.call('HGET', K.uholds, user)
    for rid in string.gmatch(list or '', '%S+') do
      local h = expire(rid)
      if h == false or (h and not is_live(h.status)) then
        forget_user_hold(K, user, rid)
      end
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
local function view(K, h, now)
  return { full_rid(K, h), h.user, h.quantity, effective_status(h.status, h.expires_at, now),
    h.expires_at, h.created_at, h.payment_ref or '' }
end

-- Records one compensation per (reservation, payment_ref): its outbox event and a
-- readable record (fg:{sku}:comps, until the flush wrote it to MySQL), in the same
-- step. Returns the compensation id (the existing one on retries).
local function compensate(K, h, payment_ref, reason, new_id, now)
  for _, comp in ipairs(h.comps) do
    local eq = string.find(comp, '=', 1, true)
    if string.sub(comp, eq + 1) == payment_ref then
      return string.sub(comp, 1, eq - 1)
    end
  end
  h.comps[#h.comps + 1] = new_id .. '=' .. payment_ref
  store_hold(K, h)
  local at = ms(now)
  local rid = full_rid(K, h)
  redis.call('XADD', K.outbox, '*', 'type', 'compensation', 'id', new_id, 'reservation_id', rid,
    'sku', sku_of_prefix(K.prefix), 'user_id', h.user, 'quantity', h.quantity,
    'payment_ref', payment_ref, 'reason', reason, 'at', at)
  redis.call('HSET', K.comps, new_id,
    cjson.encode({ rid, h.user, h.quantity, payment_ref, reason, at, 'open' }))
  return new_id
end

-- Reserves ----------------------------------------------------------------------------

-- The sale state of a SKU, read once per script call: reserve_hold counts holds into
-- it, save_sale writes it back in one HSET (a batch of 64 reserves pays one HMGET and
-- one HSET instead of one HMGET and two HINCRBY each). Nil when the SKU is not defined.
-- Deferring the write is safe: a script is atomic, and Redis refuses writes for OOM
-- only before a script's first write, never in the middle of one.
local function load_sale(meta)
  local m = redis.call('HMGET', meta, 'available', 'held', 'per_user_limit', 'hold_ms',
    'starts_at', 'ends_at', 'rlog_until', 'layout', 'claims_until', 'paused', 'wr_ms')
  if not m[1] then
    return nil
  end
  return { available = tonumber(m[1]), held = tonumber(m[2] or '0'), limit = tonumber(m[3]),
    hold_ms = tonumber(m[4]), starts_at = m[5], ends_at = m[6], changed = false,
    log_until = tonumber(m[7]), legacy = m[8] ~= '2', claims_until = tonumber(m[9] or '0'),
    paused = m[10] == '1', waiting_room = m[11] ~= false and m[11] ~= '' }
end

-- Most entries the creation log of a reconciler check takes; past it the check
-- cannot be exact (it says so) and the log stops growing.
local RECON_LOG_MAX = 2000000

-- While a reconciler check runs (recon_begin.lua), every new hold is logged: the
-- check, reading the SKU in slices, tells holds that existed at its instant from
-- those made later. (Ends of holds need no log: each is an outbox event.)
local function log_creation(K, sale, rid, quantity_text, user)
  local n = redis.call('RPUSH', K.rlog, quantity_text .. ' ' .. rid .. ' ' .. user)
  if n == 1 then
    -- A check that died leaves no log behind.
    redis.call('PEXPIREAT', K.rlog, ms(sale.log_until + 60000))
  elseif n > RECON_LOG_MAX then
    redis.call('HSET', K.meta, 'rlog_until', '0', 'rlog_over', '1')
    sale.log_until = nil
  end
end

-- claims_until: the last key lifetime of any claim, so that a retired SKU keeps its
-- usage records (the claims that replay idempotency keys) that long (sweep.lua).
local function save_sale(K, sale)
  if sale and sale.changed then
    redis.call('HSET', K.meta, 'available', ms(sale.available), 'held', ms(sale.held),
      'claims_until', ms(sale.claims_until))
    sale.changed = false
    if sale.available == 0 then
      announce_stock(K, now_ms())
    end
  end
end

-- Brings meta up to date, runs `reclaim` (which releases holds, counting in meta
-- itself), and reads the counters back into `sale`. Returns what reclaim returned.
local function reclaim_into(K, sale, reclaim)
  save_sale(K, sale)
  local released = reclaim()
  if released > 0 then
    local m = redis.call('HMGET', K.meta, 'available', 'held')
    sale.available, sale.held = tonumber(m[1]), tonumber(m[2])
  end
  return released
end

-- The reply for an idempotency key that made a hold before: `h` is load_hold's answer.
local function replay(K, h, tail, now)
  if h == nil then
    return { 'moving' } -- its reservation moved to another node: retry
  elseif not h then
    -- It ended, MySQL has it and its record went (the flush, Worker::flush_sku): the
    -- key still replays it, from MySQL's record.
    return { 'forgotten', rid_head(K) .. '.' .. tail }
  end
  local reply = view(K, h, now)
  table.insert(reply, 1, 'replayed')
  return reply
end

-- The second step of a transfer (src/buckets.rs): the receiver (meta, transfers) gets the
-- units the donor's transfer_take.lua took, once per transfer id, whoever gives and however
-- late. `read_at` is the donor's Redis time (ms) when the giver learned of the transfer
-- (the take itself, or a finisher's read of the donor's records; '' for now): a give is
-- taken only within `window` ms of it. The receiver's `in:<id>`, once the transfer is
-- done, stays marked for 2 * window more (open_transfers purges it then): any give of the
-- id still within its window was read before the donor dropped `out:<id>`, so before the
-- mark, and finds the record ('already'). Returns 'given' (now), 'already' (before:
-- nothing done), 'late' (read too long ago: nothing done, a later read gives it) or
-- 'missing' (the receiver has no state: nothing done, the units stay in transit until it
-- is rebuilt). Keeps available + held + sold == stock_total in the receiver.
local function give_units(meta, transfers, id, units, donor_tag, read_at, window)
  if redis.call('HEXISTS', transfers, 'in:' .. id) == 1 then
    return 'already'
  end
  local now = now_ms()
  if read_at ~= '' and tonumber(read_at) + window <= now then
    return 'late'
  end
  local m = redis.call('HMGET', meta, 'available', 'stock_total')
  if not m[1] then
    return 'missing'
  end
  redis.call('HSET', meta, 'available', ms(tonumber(m[1]) + units),
    'stock_total', ms(tonumber(m[2]) + units))
  redis.call('HSET', transfers, 'in:' .. id, ms(units) .. ' ' .. ms(now) .. ' ' .. donor_tag)
  redis.call('HINCRBY', meta, 'moves', 1) -- as in transfer_take.lua
  return 'given'
end

-- The transfers of a bucket not finished: its `out:` records and its `in:` records not
-- marked done. Marked `in:` records older than 2 * window (ms) go (see give_units).
local function open_transfers(transfers, now, window)
  local open = 0
  local records = redis.call('HGETALL', transfers)
  for i = 1, #records, 2 do
    local done_at = string.match(records[i + 1], '^%d+ %d+ %S+ (%d+)$')
    if not done_at then
      open = open + 1
    elseif tonumber(done_at) + 2 * window <= now then
      redis.call('HDEL', transfers, records[i])
    end
  end
  return open
end

-- Takes a hold for one request, or says why not (the body of reserve.lua and
-- reserve_batch.lua). `sale` is load_sale(meta); the caller saves it afterwards.
-- `legacy_key` is the layout-1 idempotency key (read only for layout-1 SKUs).
-- Returns the reply of reserve.lua:
--   {'created', expires_at, created_at}   (the caller knows rid, user and quantity)
--   {'replayed', rid, user, quantity, status, expires_at, created_at, payment_ref}
--   {'forgotten', rid}: the key replays a reservation that ended and that only MySQL
--               keeps now (its record goes once the flush wrote its end)
--   {'moving'}: the replayed reservation's hash is not on this node (a cluster slot
--               migrating; nothing was done, a retry after the migration answers)
--   or {refusal code}.
-- Numbers go to Redis as strings made with %d: Lua's own number-to-string conversion
-- is a float printf, a measurable share of Redis's time per reserve.
-- A rejection writes nothing but the reclaim of already expired holds; one idempotency
-- key creates at most one hold, and replays it at least as long as that hold can be
-- paid (key lifetime >= hold + payment grace); available never goes below 0.
-- An admission does not run down while nobody may use it: load_sku.lua marks the
-- moment a pause (or a start moved later) stopped the sale (q:state `frozen_at`); the
-- first script to see the sale open again moves every unused admission's deadline on by
-- the time it stood still. Bounded by the unused admissions (at most `available`).
local function thaw_admissions(admits, state, now)
  local frozen_at = redis.call('HGET', state, 'frozen_at')
  if not frozen_at then
    return
  end
  redis.call('HDEL', state, 'frozen_at')
  -- Lapsed before the sale stopped (not swept yet): they stay lapsed.
  redis.call('ZREMRANGEBYSCORE', admits, '-inf', frozen_at)
  local delay = now - tonumber(frozen_at)
  if delay <= 0 then
    return
  end
  local entries = redis.call('ZRANGE', admits, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    redis.call('ZADD', admits, string.format('%d', tonumber(entries[i + 1]) + delay), entries[i])
  end
end

-- The waiting room's admissions (queue.lua): Q = { admits = fg:{sku}:q:admits (ZSET user ->
-- admitted_until, admissions not used yet), used = fg:{sku}:q:used (HASH user ->
-- admitted_until of the admission a hold used) }. Returns the units promised to other
-- admitted users and the user's admitted_until when the user holds an admission now;
-- else nil and the refusal. An admission is valid while now < admitted_until.
local function admission_of(Q, user, now)
  local admitted_until = redis.call('ZSCORE', Q.admits, user)
  if admitted_until and tonumber(admitted_until) > now then
    return redis.call('ZCOUNT', Q.admits, '(' .. ms(now), '+inf') - 1, admitted_until
  end
  if redis.call('HEXISTS', Q.used, user) == 1 then
    return nil, 'admission_used'
  end
  return nil, 'admission_required'
end

-- `queue`: the waiting room's keys (admission_of; `state` q:state) when the caller
-- checked an admission token of this user and SKU (`replay_only` when its deadline had
-- passed by the gateway's clock: it may replay its key, nothing more), else nil. On a SKU with a waiting room every reserve needs
-- the token (nil: 'admission_required'); a new hold needs an unused admission, spends
-- it, and leaves the units promised to other admitted users alone (so admitted-unused
-- <= available holds after it); a replay of the key answers without spending anything.
local function reserve_hold(K, sale, legacy_key, user, idem, quantity, rid, idem_ttl_ms,
                            grace_ms, reclaim_limit, churn_cap, now, queue)
  if sale and sale.waiting_room and not queue then
    -- Every reserve of such a SKU carries its token, replays too (the gateway then
    -- answers this from memory for a while: src/queue.rs SeenWaitingRooms).
    return { 'admission_required' }
  end
  local u = load_usage(K, user)
  local claim = find_claim(u, idem, now)
  if claim then
    if claim.quantity ~= quantity then
      return { 'idempotency_key_reused' }
    end
    return replay(K, load_hold(K, claim.tail), claim.tail, now)
  end
  if not sale or sale.legacy then
    local prior = redis.call('GET', legacy_key)
    if prior then
      local space = string.find(prior, ' ', 1, true)
      if tonumber(string.sub(prior, 1, space - 1)) ~= quantity then
        return { 'idempotency_key_reused' }
      end
      local prior_rid = string.sub(prior, space + 1)
      return replay(K, load_hold(K, prior_rid), tail_of(prior_rid), now)
    end
  end

  if not sale then
    return { 'not_found' }
  end
  if sale.paused then
    return { 'paused' } -- an operator paused it (replays above still answer)
  end
  if sale.starts_at ~= '' and now < tonumber(sale.starts_at) then
    return { 'not_started' }
  end
  if sale.ends_at ~= '' and now >= tonumber(sale.ends_at) then
    return { 'ended' }
  end
  local promised, admitted_until = 0, nil
  if sale.waiting_room then
    if queue.replay_only then
      -- A token past its deadline (src/queue.rs): it replays its key, it buys nothing.
      return { 'admission_required' }
    end
    thaw_admissions(queue.admits, queue.state, now)
    promised, admitted_until = admission_of(queue, user, now)
    if not promised then
      return { admitted_until }
    end
  end
  if u.units + quantity > sale.limit and u.units > 0 then
    -- The user's own holds past their deadline count for nothing, swept or not.
    if reclaim_into(K, sale, function()
          return expire_user_holds(K, sale, user, now)
        end) > 0 then
      u = load_usage(K, user)
    end
  end
  if u.units + quantity > sale.limit then
    return { 'limit_exceeded' }
  end
  -- What one account can leave behind per SKU and key lifetime is bounded.
  if churn_capped(u, churn_cap, now) then
    return { 'limit_exceeded' }
  end
  if sale.available - promised < quantity then
    -- The sweeper may lag: give back what has expired before saying no.
    if reclaim_into(K, sale, function()
          return (expire_due(K, now, reclaim_limit))
        end) > 0 then
      u = load_usage(K, user)
    end
    if sale.available - promised < quantity then
      return { 'sold_out' }
    end
  end
  if admitted_until then
    -- One admission, at most one hold.
    redis.call('ZREM', queue.admits, user)
    redis.call('HSET', queue.used, user, admitted_until)
  end

  sale.available = sale.available - quantity
  sale.held = sale.held + quantity
  sale.changed = true
  local quantity_text = ms(quantity)
  local keep_until = now + math.max(tonumber(idem_ttl_ms), sale.hold_ms + tonumber(grace_ms))
  sale.claims_until = math.max(sale.claims_until, keep_until)
  local expires_at = ms(now + sale.hold_ms)
  local created_at = ms(now)
  local tail = tail_of(rid)
  u.units = u.units + quantity
  add_claim(u, idem, tail, quantity, keep_until)
  save_usage(K, u, now)
  redis.call('HSET', K.holds, tail, format_hold({ status = 'held', quantity = quantity_text,
    created_at = created_at, expires_at = expires_at, keep_until = ms(keep_until),
    comps = {}, user = user }))
  redis.call('ZADD', K.deadlines, expires_at, tail)
  if sale.log_until and now < sale.log_until then
    log_creation(K, sale, rid, quantity_text, user)
  end
  return { 'created', expires_at, created_at }
end
