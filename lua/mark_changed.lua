-- mark_changed.lua: tell the workers that a SKU's sale changed (defined, its terms
-- changed, reopened), so that they plan its visits again, and only its.
--
-- KEYS[1] fg:{skus}:gen       STRING  generation counter of the SKU index
-- KEYS[2] fg:{skus}:changed   ZSET    SKU -> the generation of its last change
-- ARGV[1] the SKU id
--
-- Reply: the new generation.
--
-- Invariant: the generation moves and the change is recorded in one step, so a
-- worker that sees generation g finds every change up to g with ZRANGEBYSCORE.
local generation = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], generation, ARGV[1])
return generation
