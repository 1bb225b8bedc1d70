"""The bus's Lua scripts: each one atomic in Redis, so a crash never leaves half of one.

SEND    KEYS: stream, hop key. ARGV: capacity (0: none), hop TTL (s), then field/value
        pairs. Returns -1 when the stream holds ``capacity`` entries (undelivered +
        unacknowledged: settled entries are deleted), 0 when the hop was sent before
        (a duplicate: nothing added), else the new entry id.
        A capacity of 0 is a reply stream: never full, and its TTL (ARGV 3 when its
        name is ``ttl``) is refreshed so a departed client's results expire.
SETTLE  KEYS: the stream of each entry. ARGV: group, then the entry ids (one per
        key, in order). Acknowledge and delete each: it no longer counts against its
        edge's capacity. Settles are batched: one call for all that are due; an entry
        Redis refuses (a key of another type) loses only itself: returns the
        1-based positions refused.
GATHER  KEYS: items list, members set. ARGV: member, data, k, TTL (s). Adds ``data``
        once per member; returns {complete, was_new, items...}: the first ``k`` items in
        arrival order once there are ``k`` (every time it is asked again: a redelivered
        input finds the same group), else {0, was_new}. The TTL restarts only while
        the group grows: a complete group must not outlive its output's hop key (a
        late redelivery would then send the joined message again).
DEAD    KEYS: dead-letter stream, the entry's stream. ARGV: group, entry id, then
        field/value pairs. Adds the entry to the dead-letter stream, then
        acknowledges and deletes it where it was, in one step: a process that dies
        in between cannot leave it in both (it would be dead-lettered twice).
        Returns 0, doing nothing, when the entry is gone already (a retry after a
        lost reply, or its holder settled it meanwhile), else 1.
RETIRE  KEYS: streams. ARGV: group, consumer. Drops ``consumer`` from each stream's
        group when it holds no pending entry there (a clean stop); a consumer that
        still holds entries is kept, so they can be claimed. Returns how many were
        dropped.
"""

from __future__ import annotations

SEND = """
local cap = tonumber(ARGV[1])
if cap > 0 and redis.call('XLEN', KEYS[1]) >= cap then return -1 end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) == false then return 0 end
if cap == 0 and ARGV[3] == 'ttl' then
  local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return id
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
"""

SETTLE = """
local refused = {}
for i, stream in ipairs(KEYS) do
  local ok = redis.pcall('XACK', stream, ARGV[1], ARGV[i + 1])
  if type(ok) == 'table' and ok.err then
    table.insert(refused, i)
  else
    redis.pcall('XDEL', stream, ARGV[i + 1])
  end
end
return refused
"""

DEAD = """
if #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return 1
"""

GATHER = """
local k = tonumber(ARGV[3])
local before = redis.call('LLEN', KEYS[1])
local new = redis.call('SADD', KEYS[2], ARGV[1])
if new == 1 and before < k then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
if before + new >= k then
  local out = {1, new}
  for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, k - 1)) do table.insert(out, item) end
  return out
end
return {0, new}
"""

RETIRE = """
local dropped = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    local ok, held = pcall(redis.call, 'XPENDING', stream, ARGV[1], '-', '+', 1, ARGV[2])
    if ok and #held == 0 then
      redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], ARGV[2])
      dropped = dropped + 1
    end
  end
end
return dropped
"""
