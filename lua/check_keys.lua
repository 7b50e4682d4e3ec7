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
-- Shadows `redis` with a table that checks each call and then forwards it.
local redis = (function(real)
  local known = {}
  for _, k in ipairs(KEYS) do
    known[k] = true
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
    for i = first, all and #args or first do
      if not known[args[i]] then
        error('undeclared key ' .. tostring(args[i]) .. ' in ' .. cmd, 3)
      end
    end
  end
  local checked = setmetatable({}, { __index = real })
  checked.call = function(...)
    check({ ... })
    return real.call(...)
  end
  checked.pcall = function(...)
    local args = { ... }
    local reply = real.pcall(...)
    if type(reply) ~= 'table' or not reply.err then
      known[args[2]] = true
    end
    return reply
  end
  return checked
end)(redis)
