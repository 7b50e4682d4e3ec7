-- check_keys.lua: debug builds only (src/store.rs prepends it to every script when
-- debug assertions are on, so the whole test suite runs with it). Not a script.
--
-- Every key a script names must be one it declared in KEYS, or a key it read through
-- redis.pcall first (a hold found through an index: its name cannot be known before
-- the script runs). On Redis Cluster the slot check before a script runs covers only
-- declared keys: while a slot migrates key by key, an undeclared key may already be on
-- the other node, and a command on it then fails in the middle of the script, after
-- some of its writes. Declared keys make the script wait for the migration instead
-- (TRYAGAIN / ASK before it runs); an index read through redis.pcall (lib.lua
-- load_hold) is checked by the script itself, before anything that depends on it.
--
-- Shadows `redis` with a table that checks each call and then forwards it. KEYS is read
-- per call, not once: in the function library (src/lua.rs) one chunk serves every
-- call, and `redis` there is looked up when a call runs (while the library loads it
-- is only the loading API).
local redis = (function()
  local function real()
    return redis
  end
  local known, known_of = {}, nil
  -- The keys this call declared (KEYS of this call), plus those read through pcall.
  local function declared()
    if known_of ~= KEYS then
      known, known_of = {}, KEYS
      for _, k in ipairs(KEYS) do
        known[k] = true
      end
    end
    return known
  end
  -- Where the key arguments of a command are: first index, and whether every later
  -- argument is a key too.
  local function key_args(cmd)
    if cmd == 'TIME' then
      return nil
    elseif cmd == 'XINFO' or cmd == 'XGROUP' then
      return 3, false
    elseif cmd == 'DEL' or cmd == 'UNLINK' or cmd == 'EXISTS' or cmd == 'MGET' then
      return 2, true
    end
    return 2, false
  end
  local function check(args)
    local cmd = string.upper(args[1])
    local first, all = key_args(cmd)
    if not first then
      return
    end
    local keys = declared()
    for i = first, all and #args or first do
      if not keys[args[i]] then
        error('undeclared key ' .. tostring(args[i]) .. ' in ' .. cmd, 3)
      end
    end
  end
  -- Only what the scripts use (call, pcall, error_reply): a library's code may not
  -- call setmetatable while it loads.
  local checked = {}
  checked.error_reply = function(...)
    return real().error_reply(...)
  end
  checked.call = function(...)
    check({ ... })
    return real().call(...)
  end
  checked.pcall = function(...)
    local args = { ... }
    local reply = real().pcall(...)
    if type(reply) ~= 'table' or not reply.err then
      declared()[args[2]] = true
    end
    return reply
  end
  return checked
end)()
