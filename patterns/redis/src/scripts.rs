//! The Lua scripts that keep a value and its namespace's index in step.
//! Each runs atomically in Redis (sent as EVALSHA, loaded again after a
//! Redis restart). They touch the value keys of one namespace by prefix, so
//! they need a single Redis server (not Redis Cluster).

use std::sync::LazyLock;

use redis::Script;

/// Stores a value and indexes its key; reaps a few index entries whose TTL
/// has passed, so a namespace with TTL churn does not grow its index.
///
/// KEYS: value key, index, expiry index.
/// ARGV: member (the user's key), value, ttl in ms (`0`: none),
///       the namespace's value-key prefix.
pub static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 10)
for _, m in ipairs(due) do
  if redis.call('EXISTS', ARGV[4] .. m) == 0 then
    redis.call('ZREM', KEYS[2], m)
  end
  redis.call('ZREM', KEYS[3], m)
end
return 1
"#,
    )
});

/// Removes a value and its index entries. Returns how many live values were
/// removed (0 or 1): an expired key counts as absent.
///
/// KEYS: value key, index, expiry index. ARGV: member.
pub static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return n
"#,
    )
});

/// One page of live entries, in key order, from the index. Index entries
/// whose value is gone (expired) are removed as they are met.
///
/// KEYS: index, expiry index.
/// ARGV: value-key prefix, ZRANGEBYLEX min, max, page size, how many index
///       entries to look at at most, a soft cap on the page's bytes.
/// Returns `{more, cursor, {k1, v1, k2, v2, ...}}`: `more` is 1 when entries
/// may follow, and the next page starts strictly after `cursor` (the last
/// index entry looked at; false when `more` is 0).
pub static LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix, min, max = ARGV[1], ARGV[2], ARGV[3]
local want, budget, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local entries = {}
local n, bytes, scanned = 0, 0, 0
local last = false
while scanned < budget do
  local batch = math.min(want - n + 1, budget - scanned)
  local members = redis.call('ZRANGEBYLEX', KEYS[1], min, max, 'LIMIT', 0, batch)
  for _, m in ipairs(members) do
    local v = redis.call('GET', prefix .. m)
    if v then
      if n == want or (n > 0 and bytes + #m + #v > max_bytes) then
        return {1, last, entries}
      end
      entries[#entries + 1] = m
      entries[#entries + 1] = v
      n = n + 1
      bytes = bytes + #m + #v
    else
      redis.call('ZREM', KEYS[1], m)
      redis.call('ZREM', KEYS[2], m)
    end
    last = m
    scanned = scanned + 1
  end
  if #members < batch then
    return {0, false, entries}
  end
  min = '(' .. members[#members]
end
return {1, last, entries}
"#,
    )
});
