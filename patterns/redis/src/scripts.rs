//! The Lua scripts that keep a value and its namespace's index in step.
//! Each runs atomically in Redis (sent as EVALSHA, loaded again after a
//! Redis restart). They touch the value keys of one namespace by prefix, so
//! they need a single Redis server (not Redis Cluster).
//!
//! A write's logic is written once, as a body that leaves its answer (an
//! integer) in `result`, and is run two ways: plain ([`PUT`], [`DELETE`]:
//! the body, then `return result`), and once per idempotency key
//! ([`PUT_ONCE`], [`DELETE_ONCE`]: [`CLAIM`], the body, then [`RECORD`]).
//! The once scripts take the plain script's KEYS and ARGV with one more key
//! (the record) and two more arguments (the claim, the retention) at the
//! end, so the body reads its own KEYS and ARGV unchanged.

use std::sync::LazyLock;

use redis::Script;

/// Stores a value and indexes its key; reaps a few index entries whose TTL
/// has passed, so a namespace with TTL churn does not grow its index.
/// Its first write is the value's `SET`: if that fails, nothing is written.
///
/// KEYS: value key, index, expiry index.
/// ARGV: member (the user's key), value, ttl in ms (`0`: none),
///       the namespace's value-key prefix.
/// `result`: 1.
const PUT_BODY: &str = r#"
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
local result = 1
"#;

/// Removes a value and its index entries.
///
/// KEYS: value key, index, expiry index. ARGV: member.
/// `result`: how many live values were removed (0 or 1): an expired key
/// counts as absent.
const DELETE_BODY: &str = r#"
local result = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
"#;

/// The start of a once script: if the idempotency record (the last KEY)
/// exists, answer from it without writing. The claim (the next-to-last
/// ARGV) is the method's name, a space and the request's fingerprint; a
/// record is `<result> <claim>`, so the same key with another method or
/// another fingerprint is a different request.
///
/// Answers `{1, result}` (replayed) when the recorded claim is this one,
/// `{2, 0}` (reused) when not, and an error for a record it cannot read
/// (something else wrote there).
const CLAIM: &str = r#"
local record, claim = KEYS[#KEYS], ARGV[#ARGV - 1]
local held = redis.call('GET', record)
if held then
  local recorded, first = string.match(held, '^(%-?%d+) (.*)$')
  if not recorded then
    return redis.error_reply('ERR unreadable idempotency record at ' .. record)
  end
  if first == claim then
    return {1, tonumber(recorded)}
  end
  return {2, 0}
end
"#;

/// The end of a once script, after the body: records the body's `result`
/// under the claim for the retention (the last ARGV, ms ≥ 1), and answers
/// `{0, result}` (executed). It is the script's last write, so a body that
/// fails records nothing.
const RECORD: &str = r#"
redis.call('SET', record, result .. ' ' .. claim, 'PX', ARGV[#ARGV])
return {0, result}
"#;

/// What a once script answered, the first element of its reply: the write
/// ran now (`{EXECUTED, result}`), an earlier one with the same claim ran
/// (`{REPLAYED, its result}`), or the key was used for another request
/// (`{REUSED, 0}`).
pub const EXECUTED: i64 = 0;
pub const REPLAYED: i64 = 1;
pub const REUSED: i64 = 2;

fn plain(body: &str) -> Script {
    Script::new(&format!("{body}return result\n"))
}

fn once(body: &str) -> Script {
    Script::new(&format!("{CLAIM}{body}{RECORD}"))
}

/// [`PUT_BODY`]: stores a value and indexes its key. Returns 1.
///
/// KEYS: value key, index, expiry index.
/// ARGV: member (the user's key), value, ttl in ms (`0`: none),
///       the namespace's value-key prefix.
pub static PUT: LazyLock<Script> = LazyLock::new(|| plain(PUT_BODY));

/// [`PUT`] once per idempotency key.
///
/// KEYS: [`PUT`]'s, then the record key.
/// ARGV: [`PUT`]'s, then the claim (`PUT <fingerprint>`), the retention in
///       ms (≥ 1).
/// Returns `{outcome, 1}` ([`EXECUTED`], [`REPLAYED`]) or `{REUSED, 0}`.
pub static PUT_ONCE: LazyLock<Script> = LazyLock::new(|| once(PUT_BODY));

/// [`DELETE_BODY`]: removes a value and its index entries. Returns how many
/// live values were removed (0 or 1): an expired key counts as absent.
///
/// KEYS: value key, index, expiry index. ARGV: member.
pub static DELETE: LazyLock<Script> = LazyLock::new(|| plain(DELETE_BODY));

/// [`DELETE`] once per idempotency key: a replay answers the recorded count.
///
/// KEYS: [`DELETE`]'s, then the record key.
/// ARGV: [`DELETE`]'s, then the claim (`DELETE <fingerprint>`), the
///       retention in ms (≥ 1).
/// Returns `{outcome, removed}` ([`EXECUTED`], [`REPLAYED`]) or `{REUSED, 0}`.
pub static DELETE_ONCE: LazyLock<Script> = LazyLock::new(|| once(DELETE_BODY));

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

#[cfg(test)]
mod tests {
    use super::*;

    fn once_source(body: &str) -> String {
        format!("{CLAIM}{body}{RECORD}")
    }

    #[test]
    fn plain_and_once_scripts_share_the_write() {
        for body in [PUT_BODY, DELETE_BODY] {
            assert_eq!(
                plain(body).get_hash(),
                Script::new(&format!("{body}return result\n")).get_hash()
            );
            assert_eq!(
                once(body).get_hash(),
                Script::new(&once_source(body)).get_hash()
            );
        }
        assert_ne!(PUT.get_hash(), PUT_ONCE.get_hash());
        assert_ne!(DELETE.get_hash(), DELETE_ONCE.get_hash());
    }

    #[test]
    fn the_claim_writes_nothing_and_the_record_is_the_last_write() {
        let writes = ["'SET'", "'DEL'", "'ZADD'", "'ZREM'"];
        assert!(writes.iter().all(|w| !CLAIM.contains(w)), "{CLAIM}");
        for body in [PUT_BODY, DELETE_BODY] {
            let source = once_source(body);
            let record = source.find("redis.call('SET', record").unwrap();
            let last_write = writes
                .iter()
                .filter_map(|w| source.rfind(&format!("redis.call({w}")))
                .max()
                .unwrap();
            assert_eq!(last_write, record, "{source}");
            // Every path out of the claim returns before the body runs.
            assert!(source.find(body).unwrap() > source.find("return {2, 0}").unwrap());
        }
    }
}
