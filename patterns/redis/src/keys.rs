//! Where a namespace's data lives in Redis, and the opaque page token.
//!
//! For namespace `ns` under the configured `key_prefix` `P`:
//!
//! | Redis key | type | holds |
//! |-----------|------|-------|
//! | `P{ns}:v:{key}` | string | the value (with the TTL as the key's own expiry) |
//! | `P{ns}:i` | sorted set | every key of the namespace, score 0: the ordered index `List` pages through |
//! | `P{ns}:e` | sorted set | keys with a TTL, scored by expiry (ms): lets writes reap stale index entries |
//! | `P{ns}:idem:{idempotency key}` | string | an idempotency record: `<result> <method> <fingerprint>`, with the retention as the key's own expiry |
//!
//! `{ns}` is escaped (`%` → `%25`, `:` → `%3A`) so it never contains `:`:
//! the first `:` after the prefix always ends the namespace, and two
//! namespaces can never share a Redis key. Names allowed by the proxy
//! (`[a-z0-9_-]`) are unchanged by the escaping. Within a namespace the
//! part after that `:` (`v:`, `i`, `e`, `idem:`) keeps values, indexes and
//! records apart, whatever the user's keys and idempotency keys are.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pattern_sdk::Error;

/// The Redis keys of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// `P{ns}:v:`; a value's key is this followed by the user's key.
    pub value_prefix: String,
    /// `P{ns}:i`
    pub index: String,
    /// `P{ns}:e`
    pub expiry: String,
    /// `P{ns}:idem:`; an idempotency record's key is this followed by the
    /// client's idempotency key.
    pub record_prefix: String,
}

impl Namespace {
    pub fn new(key_prefix: &str, namespace: &str) -> Self {
        let base = format!("{key_prefix}{}", escape(namespace));
        Self {
            value_prefix: format!("{base}:v:"),
            index: format!("{base}:i"),
            expiry: format!("{base}:e"),
            record_prefix: format!("{base}:idem:"),
        }
    }

    /// The Redis key holding `key`'s value.
    pub fn value_key(&self, key: &str) -> String {
        format!("{}{key}", self.value_prefix)
    }

    /// The Redis key holding the record of idempotency key `key`.
    pub fn record_key(&self, key: &str) -> String {
        format!("{}{key}", self.record_prefix)
    }
}

/// Escapes `%` and `:` so the result contains no `:`, injectively.
pub fn escape(namespace: &str) -> String {
    let mut out = String::with_capacity(namespace.len());
    for c in namespace.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
    out
}

/// The `ZRANGEBYLEX` bounds for one page: keys starting with `prefix`,
/// strictly after `after` when given.
pub fn lex_range(prefix: &str, after: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let min = match after {
        Some(after) if after >= prefix => [b"(", after.as_bytes()].concat(),
        _ if prefix.is_empty() => b"-".to_vec(),
        _ => [b"[", prefix.as_bytes()].concat(),
    };
    let max = match successor(prefix.as_bytes()) {
        Some(succ) => [b"(".as_slice(), &succ].concat(),
        None => b"+".to_vec(),
    };
    (min, max)
}

/// The smallest byte string greater than every string starting with
/// `prefix`, or `None` when there is none (empty, or all 0xFF).
pub fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut succ = prefix.to_vec();
    while let Some(last) = succ.pop() {
        if last < u8::MAX {
            succ.push(last + 1);
            return Some(succ);
        }
    }
    None
}

/// The page token for a page whose last key (returned or skipped) is `key`.
pub fn encode_token(key: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(key)
}

/// The key a page token stands for; a token this pattern did not make is
/// `INVALID_ARGUMENT`.
pub fn decode_token(token: &str) -> Result<String, Error> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| {
            Error::invalid_argument(
                "page_token",
                "is not a token this pattern issued; pass the next_page_token of the previous \
                 List response unchanged, or leave it empty for the first page",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_readable_for_ordinary_names() {
        let ns = Namespace::new("trellis:", "default");
        assert_eq!(ns.value_key("a/b"), "trellis:default:v:a/b");
        assert_eq!(ns.index, "trellis:default:i");
        assert_eq!(ns.expiry, "trellis:default:e");
        assert_eq!(ns.record_key("req-1"), "trellis:default:idem:req-1");
    }

    #[test]
    fn namespaces_cannot_collide() {
        // Without escaping, ("a:v:b", "c") and ("a", "b:v:c")… would share keys.
        let one = Namespace::new("p:", "a:v:b");
        let two = Namespace::new("p:", "a");
        assert_ne!(one.value_key("c"), two.value_key("b:v:c"));
        assert_ne!(one.index, two.value_key("b:i"));
        assert_ne!(one.record_key("c"), two.value_key("b:idem:c"));
        assert_ne!(one.record_key("c"), two.record_key("b:idem:c"));
        // Escaping is injective: distinct names give distinct escapes.
        let names = ["a:b", "a%3Ab", "a%b", "a%25b", "a", "a:", "a%"];
        let escaped: std::collections::HashSet<_> = names.iter().map(|n| escape(n)).collect();
        assert_eq!(escaped.len(), names.len());
        assert!(escaped.iter().all(|e| !e.contains(':')));
    }

    #[test]
    fn records_never_share_a_key_with_values_or_indexes() {
        let ns = Namespace::new("p:", "ns");
        // Whatever the user's key, a value key starts `p:ns:v:`, and a
        // record key `p:ns:idem:`: neither starts the other.
        for key in ["", "idem:x", ":idem:x", "i", "e"] {
            let value = ns.value_key(key);
            let record = ns.record_key(key);
            assert!(!record.starts_with(&ns.value_prefix), "{record}");
            assert!(!value.starts_with(&ns.record_prefix), "{value}");
            assert!(record != ns.index && record != ns.expiry, "{record}");
        }
        // Namespaces stay apart for records too.
        assert_ne!(
            Namespace::new("p:", "a:idem:b").record_key("c"),
            Namespace::new("p:", "a").record_key("b:idem:c")
        );
    }

    #[test]
    fn successor_bounds_every_extension() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
    }

    #[test]
    fn lex_ranges() {
        assert_eq!(lex_range("", None), (b"-".to_vec(), b"+".to_vec()));
        assert_eq!(lex_range("ab", None), (b"[ab".to_vec(), b"(ac".to_vec()));
        assert_eq!(
            lex_range("ab", Some("abc")),
            (b"(abc".to_vec(), b"(ac".to_vec())
        );
        // A cursor before the prefix (a token from another listing) starts at the prefix.
        assert_eq!(
            lex_range("ab", Some("aa")),
            (b"[ab".to_vec(), b"(ac".to_vec())
        );
        assert_eq!(lex_range("", Some("k")), (b"(k".to_vec(), b"+".to_vec()));
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = encode_token("session/42 é".as_bytes());
        assert_eq!(decode_token(&t).unwrap(), "session/42 é");
        assert!(matches!(
            decode_token("not base64!"),
            Err(Error::InvalidArgument(_))
        ));
        // Valid base64 but not UTF-8.
        assert!(decode_token(&encode_token(b"\xff")).is_err());
    }
}
