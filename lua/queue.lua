-- queue.lua: the waiting room of one SKU (src/queue.rs): join it, read a ticket, or
-- watch it. Every call first admits whom the stock allows (below), so the queue moves
-- whenever anyone looks at it, and no timer has to run for it.
--
-- KEYS[1] fg:{sku}:meta   KEYS[2] fg:{sku}:q:line   KEYS[3] fg:{sku}:q:admits
-- KEYS[4] fg:{sku}:q:used   KEYS[5] fg:{sku}:q:state
-- ARGV[1] 'join' | 'ticket' | 'watch', or 'batch' (several joins and tickets, below)
-- ARGV[2] user id ('' for watch)
-- ARGV[3] join: a secret random integer in [0, 2^52) from the gateway's CSPRNG, the
--         user's place in the shuffled pre-queue (used only before the start)
-- ARGV[4] most admissions in this call (bounds its time)
-- 'batch': ARGV[2] most admissions, then one (mode, user id, draw) triple per request,
--         mode 'join' or 'ticket': the requests are taken in order (joins in arrival
--         order), then the call admits once, then each gets its reply as a call of its
--         own made then would (src/queue.rs QueueReads batches a SKU's joins and polls).
--
-- Keys (meta `wr_ms` = admission_seconds in ms, `wr_rate` = admit_per_second (0: as fast
-- as stock allows), `wr_shuffle` = '1' to shuffle the pre-queue):
--   q:line    ZSET  user -> order. Before the start: the random draw (or the pre-queue
--                   arrival count when not shuffled), below 2^52; from the start on:
--                   2^52 + arrival count. Position = rank + 1, fixed from the start.
--   q:admits  ZSET  user -> admitted_until (ms): admissions not used and not lapsed
--   q:used    HASH  user -> admitted_until of the admission a hold used (reserve.lua)
--   q:state   HASH  served (ranks admitted so far, in order), arrivals, pre_arrivals,
--                   started ('1' once a call saw the start), first_admit_at and
--                   first_burst (the first admissions, made at once),
--                   rate_at / rate_n (the current second's admissions)
--
-- Replies ('batch': one join / ticket reply per request, in order):
--   {'not_found'}        the SKU has no state in Redis
--   {'no_waiting_room'}
--   join / ticket: {state, position ('' before the start), served, line length,
--                   admitted_until ('' unless admitted or used), first_admit_at ('' when
--                   nobody was admitted yet), now, admit_per_second, then the tail}
--     state: 'none' (ticket: the user has no ticket), 'waiting', 'admitted', 'used'
--            (its admission made a hold), 'lapsed' (unused past admitted_until),
--            'sold_out', 'closed' (for a waiting or admitted ticket, and for anyone
--            once the sale is over: a join then takes no place)
--   watch: {phase ('pre' | 'open' | 'sold_out' | 'closed'), served, line length,
--           first_admit_at or '', now, admit_per_second, then the tail}
--   the tail: admission ms, units not sold (stock_total - sold), starts_at ('' for
--             none), the first admissions' count (made at first_admit_at, at once)
--
-- Admission: in rank order, while available minus unused admissions is above 0, at most
-- admit_per_second per second; an admission unused at admitted_until lapses and its
-- unit goes to the next rank. Not before the start, nor while paused, sold out or closed;
-- while paused or before the start admissions do not lapse (lib.lua thaw_admissions
-- moves their deadlines on by the time the sale stood still).
-- Invariants: one place per user (ZSCORE before ZADD, atomically); a rank is admitted
-- once (`served` only grows); unused admissions <= available after every admission,
-- since each takes one unit of `available - unused` (reserve.lua keeps it on spending).
local meta, line, admits, used, state = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local mode = ARGV[1]
-- The joins and tickets of this call: {mode, user, draw} each.
local requests, admit_max = {}, tonumber(ARGV[4])
if mode == 'batch' then
  admit_max = tonumber(ARGV[2])
  for i = 3, #ARGV, 3 do
    requests[#requests + 1] = { ARGV[i], ARGV[i + 1], ARGV[i + 2] }
  end
elseif mode ~= 'watch' then
  requests[1] = { mode, ARGV[2], ARGV[3] }
end
local AFTER_START = 4503599627370496 -- 2^52: every draw and pre-queue count is below it

local m = redis.call('HMGET', meta, 'available', 'sold', 'stock_total', 'starts_at',
  'ends_at', 'wr_ms', 'wr_rate', 'wr_shuffle', 'retired', 'paused')
-- The reply of every request when there is no waiting room to read.
local function to_all(word)
  if mode ~= 'batch' then
    return { word }
  end
  local replies = {}
  for i = 1, #requests do
    replies[i] = { word }
  end
  return replies
end
if not m[3] then
  return to_all('not_found')
end
if not m[6] or m[6] == '' then
  return to_all('no_waiting_room')
end
local now = now_ms()
local available, sold, stock_total = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
local admission_ms, rate = tonumber(m[6]), tonumber(m[7] or '0')
local paused = m[10] == '1'

-- Closed first (a retired sale's keys are gone: nothing below may write them back),
-- then the pre-queue (before the start nothing is final), then sold out. A stock of 0
-- is not sold out: it waits for stock.
local phase = 'open'
if m[9] or (m[5] ~= '' and now >= tonumber(m[5])) then
  phase = 'closed'
elseif m[4] ~= '' and now < tonumber(m[4]) then
  phase = 'pre'
elseif stock_total > 0 and sold >= stock_total then
  phase = 'sold_out'
end

local s = redis.call('HMGET', state, 'served', 'started', 'first_admit_at', 'rate_at', 'rate_n',
  'first_burst')
local served = tonumber(s[1] or '0')
local started = s[2] == '1'
if phase ~= 'pre' and phase ~= 'closed' and not started then
  -- From now on joins are in arrival order behind the pre-queue, even if the start moves.
  redis.call('HSET', state, 'started', '1')
  started = true
end

-- Each request's place (nil: none), joins taken in order.
local scores = {}
for i, r in ipairs(requests) do
  local score = redis.call('ZSCORE', line, r[2])
  if r[1] == 'join' and not score and (phase == 'open' or phase == 'pre') then
    if started then
      score = string.format('%d', AFTER_START + redis.call('HINCRBY', state, 'arrivals', 1))
    elseif m[8] == '1' then
      score = r[3]
    else
      score = redis.call('HINCRBY', state, 'pre_arrivals', 1)
    end
    redis.call('ZADD', line, score, r[2])
  end
  scores[i] = score or false
end

-- Admissions do not run down while nobody may use them (paused, before the start):
-- load_sku.lua moves their deadlines on by the time the sale stood still.
if phase ~= 'pre' and not paused then
  thaw_admissions(admits, state, now)
  redis.call('ZREMRANGEBYSCORE', admits, '-inf', now) -- lapsed
end
local first_admit_at = s[3] or ''
local first_burst = s[6] or '0'
local total = redis.call('ZCARD', line)
if phase == 'open' and not paused then
  local n = math.min(available - redis.call('ZCARD', admits), total - served, admit_max)
  local rate_at, rate_n = tonumber(s[4] or '0'), tonumber(s[5] or '0')
  if rate > 0 then
    if now - rate_at >= 1000 then
      rate_at, rate_n = now, 0
    end
    n = math.min(n, rate - rate_n)
  end
  if n > 0 then
    local admitted_until = string.format('%d', now + admission_ms)
    local users = redis.call('ZRANGE', line, served, served + n - 1)
    local args = {}
    for i, u in ipairs(users) do
      args[2 * i - 1] = admitted_until
      args[2 * i] = u
    end
    redis.call('ZADD', admits, unpack(args))
    served = served + #users
    if first_admit_at == '' then
      -- The first admissions come at once (the stock on hand): the pace of the line is
      -- measured after them (src/queue.rs eta_seconds).
      first_admit_at, first_burst = string.format('%d', now), #users
      redis.call('HSET', state, 'first_burst', first_burst)
    end
    redis.call('HSET', state, 'served', served, 'first_admit_at', first_admit_at,
      'rate_at', string.format('%d', rate_at), 'rate_n', rate_n + #users)
  end
end

local now_text = string.format('%d', now)
-- What every reply ends with: how the line moves and what is left to sell.
local tail = { admission_ms, stock_total - sold, m[4], first_burst }
local function with_tail(reply)
  for _, v in ipairs(tail) do
    reply[#reply + 1] = v
  end
  return reply
end
if mode == 'watch' then
  return with_tail({ phase, served, total, first_admit_at, now_text, rate })
end

-- One join / ticket reply.
local function reply_to(user, score)
  if not score then
    -- Over: everyone is told so, with or without a place (none is made now).
    if phase == 'sold_out' or phase == 'closed' then
      return with_tail({ phase, '', served, total, '', first_admit_at, now_text, rate })
    end
    return with_tail({ 'none', '', served, total, '', first_admit_at, now_text, rate })
  end
  local position = ''
  if started then
    position = redis.call('ZRANK', line, user) + 1
  end
  local ticket, admitted_until = 'waiting', redis.call('ZSCORE', admits, user)
  if admitted_until then
    ticket = 'admitted'
  else
    admitted_until = redis.call('HGET', used, user)
    if admitted_until then
      ticket = 'used'
    elseif started and position <= served then
      ticket = 'lapsed'
    end
  end
  if (phase == 'sold_out' or phase == 'closed') and (ticket == 'waiting' or ticket == 'admitted') then
    ticket = phase
  end
  return with_tail({ ticket, position, served, total, admitted_until or '', first_admit_at,
    now_text, rate })
end

local replies = {}
for i, r in ipairs(requests) do
  replies[i] = reply_to(r[2], scores[i])
end
if mode == 'batch' then
  return replies
end
return replies[1]
