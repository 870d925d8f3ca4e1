//! The map behind memstore: values under (namespace, key) in key order, each
//! with an optional expiry time. Safe to share between threads; no lock is
//! ever held across an `.await` (there is none in here).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use pattern_sdk::{Error, ListPage, ListQuery};
use tokio::time::Instant;

/// `(namespace, key)`: namespaces cannot collide, and one namespace's keys
/// sit together in ascending order.
type Key = (String, String);

struct Entry {
    value: Bytes,
    /// `None`: never expires.
    expires_at: Option<Instant>,
}

impl Entry {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

#[derive(Default)]
struct Maps {
    entries: BTreeMap<Key, Entry>,
    /// The keys that have a TTL, soonest first, so purging never scans.
    expirations: BTreeSet<(Instant, Key)>,
}

impl Maps {
    fn purge_expired(&mut self, now: Instant) -> usize {
        let mut purged = 0;
        while self.expirations.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, key)) = self.expirations.pop_first() {
                self.entries.remove(&key);
                purged += 1;
            }
        }
        purged
    }
}

pub struct Store {
    maps: RwLock<Maps>,
    max_keys: usize,
}

impl Store {
    pub fn new(max_keys: usize) -> Self {
        Self {
            maps: RwLock::default(),
            max_keys,
        }
    }

    // Every critical section leaves the maps consistent, so a lock poisoned
    // by a panic elsewhere is still safe to use.
    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live value under `key`; expired keys are invisible at once.
    pub fn get(&self, namespace: &str, key: &str) -> Option<Bytes> {
        let now = Instant::now();
        let key = (namespace.to_owned(), key.to_owned());
        let maps = self.read();
        let entry = maps.entries.get(&key).filter(|e| e.is_live(now))?;
        Some(entry.value.clone())
    }

    /// Stores `value`, replacing any previous value and TTL.
    pub fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let now = Instant::now();
        // A TTL beyond the clock's range means "never" in practice.
        let expires_at = ttl.and_then(|ttl| now.checked_add(ttl));
        let key = (namespace.to_owned(), key.to_owned());
        let mut maps = self.write();
        if !maps.entries.contains_key(&key) && maps.entries.len() >= self.max_keys {
            maps.purge_expired(now);
            if maps.entries.len() >= self.max_keys {
                return Err(Error::resource_exhausted(format!(
                    "memstore is full: it holds its limit of {} keys; delete keys, give them a \
                     ttl, or raise `max_keys` in this pattern's config",
                    self.max_keys
                )));
            }
        }
        let entry = Entry { value, expires_at };
        if let Some(old) = maps.entries.insert(key.clone(), entry)
            && let Some(at) = old.expires_at
        {
            maps.expirations.remove(&(at, key.clone()));
        }
        if let Some(at) = expires_at {
            maps.expirations.insert((at, key));
        }
        Ok(())
    }

    /// Removes `key`; `true` if it was live.
    pub fn delete(&self, namespace: &str, key: &str) -> bool {
        let now = Instant::now();
        let key = (namespace.to_owned(), key.to_owned());
        let mut maps = self.write();
        let Some(old) = maps.entries.remove(&key) else {
            return false;
        };
        if let Some(at) = old.expires_at {
            maps.expirations.remove(&(at, key));
        }
        old.is_live(now)
    }

    /// One page of live entries whose keys start with the prefix, in key
    /// order. The page token is the last key returned (base64), and the next
    /// page starts strictly after it: keys added or removed between pages
    /// cause neither duplicates nor gaps.
    pub fn list(&self, namespace: &str, query: &ListQuery) -> Result<ListPage, Error> {
        let after = query.page_token.as_deref().map(decode_token).transpose()?;
        let start = match after {
            Some(after) if after >= query.prefix => Bound::Excluded((namespace.to_owned(), after)),
            _ => Bound::Included((namespace.to_owned(), query.prefix.clone())),
        };
        let now = Instant::now();
        let maps = self.read();
        // Keys with a common prefix are contiguous, so stop at the first
        // key without it.
        let live = maps
            .entries
            .range((start, Bound::Unbounded))
            .take_while(|((ns, key), _)| ns == namespace && key.starts_with(&query.prefix))
            .filter(|(_, entry)| entry.is_live(now));
        Ok(ListPage::fill(
            live.map(|((_, key), entry)| (key.clone(), entry.value.clone())),
            query.page_size,
            |last| URL_SAFE_NO_PAD.encode(last),
        ))
    }

    /// Removes every expired entry; returns how many.
    pub fn purge_expired(&self) -> usize {
        self.write().purge_expired(Instant::now())
    }

    /// Entries held, expired ones not yet purged included.
    #[cfg(test)]
    fn stored(&self) -> usize {
        self.read().entries.len()
    }
}

fn decode_token(token: &str) -> Result<String, Error> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| {
            Error::invalid_argument(
                "page_token",
                "is not a token this pattern returned; pass next_page_token from the previous \
                 response unchanged, or leave it empty for the first page",
            )
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::advance;

    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn query(prefix: &str, page_size: usize, page_token: Option<String>) -> ListQuery {
        ListQuery {
            prefix: prefix.into(),
            page_size,
            page_token,
        }
    }

    fn keys(page: &ListPage) -> Vec<&str> {
        page.entries.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Every key in `ns` with `prefix`, page by page.
    fn list_all(store: &Store, ns: &str, prefix: &str, page_size: usize) -> Vec<String> {
        let mut all = Vec::new();
        let mut token = None;
        loop {
            let page = store.list(ns, &query(prefix, page_size, token)).unwrap();
            assert!(page.entries.len() <= page_size);
            all.extend(page.entries.into_iter().map(|(k, _)| k));
            match page.next_page_token {
                Some(t) => token = Some(t),
                None => return all,
            }
        }
    }

    #[tokio::test]
    async fn round_trip() {
        let s = Store::new(10);
        assert_eq!(s.get("ns", "k"), None);
        s.put("ns", "k", b("v"), None).unwrap();
        assert_eq!(s.get("ns", "k"), Some(b("v")));
    }

    #[tokio::test]
    async fn overwrite_replaces_value() {
        let s = Store::new(10);
        s.put("ns", "k", b("1"), None).unwrap();
        s.put("ns", "k", b("2"), None).unwrap();
        assert_eq!(s.get("ns", "k"), Some(b("2")));
        assert_eq!(s.stored(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_expires_exactly_on_time() {
        let s = Store::new(10);
        s.put("ns", "k", b("v"), Some(Duration::from_secs(10)))
            .unwrap();
        advance(Duration::from_millis(9_999)).await;
        assert_eq!(s.get("ns", "k"), Some(b("v")));
        assert_eq!(keys(&s.list("ns", &query("", 10, None)).unwrap()), ["k"]);

        advance(Duration::from_millis(1)).await;
        assert_eq!(s.get("ns", "k"), None);
        assert!(
            s.list("ns", &query("", 10, None))
                .unwrap()
                .entries
                .is_empty()
        );
        // Still stored until purged, but a delete does not count it.
        assert_eq!(s.stored(), 1);
        assert!(!s.delete("ns", "k"));
        assert_eq!(s.stored(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn overwrite_replaces_ttl() {
        let s = Store::new(10);
        s.put("ns", "keep", b("1"), Some(Duration::from_secs(1)))
            .unwrap();
        s.put("ns", "keep", b("2"), None).unwrap();
        s.put("ns", "drop", b("1"), None).unwrap();
        s.put("ns", "drop", b("2"), Some(Duration::from_secs(1)))
            .unwrap();
        advance(Duration::from_secs(2)).await;
        assert_eq!(s.get("ns", "keep"), Some(b("2")));
        assert_eq!(s.get("ns", "drop"), None);
        // The replaced TTL must not purge the new value.
        assert_eq!(s.purge_expired(), 1);
        assert_eq!(s.get("ns", "keep"), Some(b("2")));
    }

    #[tokio::test(start_paused = true)]
    async fn same_ttl_twice_at_the_same_instant() {
        let s = Store::new(10);
        s.put("ns", "k", b("1"), Some(Duration::from_secs(1)))
            .unwrap();
        s.put("ns", "k", b("2"), Some(Duration::from_secs(1)))
            .unwrap();
        advance(Duration::from_secs(1)).await;
        assert_eq!(s.purge_expired(), 1);
        assert_eq!(s.stored(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn purge_removes_only_expired_keys() {
        let s = Store::new(10);
        s.put("ns", "short", b("v"), Some(Duration::from_secs(1)))
            .unwrap();
        s.put("ns", "long", b("v"), Some(Duration::from_secs(60)))
            .unwrap();
        s.put("ns", "forever", b("v"), None).unwrap();
        assert_eq!(s.purge_expired(), 0);
        advance(Duration::from_secs(1)).await;
        assert_eq!(s.purge_expired(), 1);
        assert_eq!(s.stored(), 2);
        assert_eq!(s.get("ns", "long"), Some(b("v")));
    }

    #[tokio::test]
    async fn huge_ttl_never_expires() {
        let s = Store::new(10);
        s.put("ns", "k", b("v"), Some(Duration::MAX)).unwrap();
        assert_eq!(s.get("ns", "k"), Some(b("v")));
    }

    #[tokio::test]
    async fn namespaces_are_isolated() {
        let s = Store::new(10);
        s.put("a", "k", b("in a"), None).unwrap();
        s.put("b", "k", b("in b"), None).unwrap();
        // A store that joined "ns/key" would mix these two up.
        s.put("x", "y/z", b("1"), None).unwrap();
        s.put("x/y", "z", b("2"), None).unwrap();
        assert_eq!(s.get("a", "k"), Some(b("in a")));
        assert_eq!(s.get("b", "k"), Some(b("in b")));
        assert_eq!(s.get("x", "y/z"), Some(b("1")));
        assert_eq!(s.get("x/y", "z"), Some(b("2")));
        assert_eq!(list_all(&s, "a", "", 10), ["k"]);
        assert_eq!(list_all(&s, "x", "", 10), ["y/z"]);
        assert!(s.delete("a", "k"));
        assert_eq!(s.get("b", "k"), Some(b("in b")));
    }

    #[tokio::test]
    async fn delete_is_idempotent() {
        let s = Store::new(10);
        s.put("ns", "k", b("v"), None).unwrap();
        assert!(s.delete("ns", "k"));
        assert!(!s.delete("ns", "k"));
        assert!(!s.delete("ns", "never-was"));
        assert_eq!(s.get("ns", "k"), None);
    }

    #[tokio::test]
    async fn pagination_returns_every_key_exactly_once_in_order() {
        let s = Store::new(1000);
        let mut want: Vec<String> = (0..250).map(|i| format!("key-{i}")).collect();
        for k in &want {
            s.put("ns", k, b(k), None).unwrap();
        }
        s.put("other", "key-x", b("x"), None).unwrap();
        want.sort();
        for page_size in [1, 7, 100, 250, 1000] {
            assert_eq!(
                list_all(&s, "ns", "", page_size),
                want,
                "page_size {page_size}"
            );
        }
    }

    #[tokio::test]
    async fn last_page_has_no_token() {
        let s = Store::new(100);
        for i in 0..10 {
            s.put("ns", &format!("k{i}"), b("v"), None).unwrap();
        }
        let first = s.list("ns", &query("", 5, None)).unwrap();
        assert_eq!(first.entries.len(), 5);
        let second = s.list("ns", &query("", 5, first.next_page_token)).unwrap();
        assert_eq!(keys(&second), ["k5", "k6", "k7", "k8", "k9"]);
        assert_eq!(second.next_page_token, None);
        assert_eq!(
            s.list("empty", &query("", 5, None)).unwrap(),
            ListPage::default()
        );
    }

    #[tokio::test]
    async fn values_come_with_their_keys() {
        let s = Store::new(10);
        s.put("ns", "a", b("1"), None).unwrap();
        s.put("ns", "b", b("2"), None).unwrap();
        let page = s.list("ns", &query("", 10, None)).unwrap();
        assert_eq!(page.entries, [("a".into(), b("1")), ("b".into(), b("2"))]);
    }

    #[tokio::test]
    async fn prefix_filters_keys() {
        let s = Store::new(100);
        for k in ["a", "a/1", "a/2", "a/3", "a0", "ab", "b/1", "a/"] {
            s.put("ns", k, b(k), None).unwrap();
        }
        assert_eq!(list_all(&s, "ns", "a/", 10), ["a/", "a/1", "a/2", "a/3"]);
        assert_eq!(list_all(&s, "ns", "a/", 1), ["a/", "a/1", "a/2", "a/3"]);
        assert_eq!(list_all(&s, "ns", "zz", 10), Vec::<String>::new());
        assert_eq!(list_all(&s, "ns", "", 3).len(), 8);
    }

    #[tokio::test]
    async fn keys_changed_between_pages_cause_no_duplicates_or_gaps() {
        let s = Store::new(100);
        for k in ["b", "d", "f", "h"] {
            s.put("ns", k, b(k), None).unwrap();
        }
        let first = s.list("ns", &query("", 2, None)).unwrap();
        assert_eq!(keys(&first), ["b", "d"]);
        // Before the cursor: not seen (already passed). After: seen once.
        s.put("ns", "a", b("a"), None).unwrap();
        s.put("ns", "c", b("c"), None).unwrap();
        s.put("ns", "e", b("e"), None).unwrap();
        // Deleting the cursor key itself does not lose our place.
        assert!(s.delete("ns", "d"));
        let rest = list_all_from(&s, first.next_page_token);
        assert_eq!(rest, ["e", "f", "h"]);
    }

    fn list_all_from(s: &Store, mut token: Option<String>) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(t) = token {
            let page = s.list("ns", &query("", 2, Some(t))).unwrap();
            all.extend(page.entries.into_iter().map(|(k, _)| k));
            token = page.next_page_token;
        }
        all
    }

    #[test]
    fn pagination_while_another_thread_inserts() {
        let s = Arc::new(Store::new(100_000));
        let original: Vec<String> = (0..500).map(|i| format!("k{i:04}")).collect();
        for k in &original {
            s.put("ns", k, b("v"), None).unwrap();
        }
        let writer = std::thread::spawn({
            let s = Arc::clone(&s);
            move || {
                for i in 0..5000 {
                    s.put("ns", &format!("k{:04}-{i}", i % 500), b("new"), None)
                        .unwrap();
                }
            }
        });
        let seen = list_all(&s, "ns", "", 13);
        writer.join().unwrap();
        // Strictly ascending: nothing twice, nothing out of order.
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        // Every key that existed throughout was returned.
        for k in &original {
            assert!(seen.binary_search(k).is_ok(), "{k} missing");
        }
    }

    #[tokio::test]
    async fn malformed_page_token_is_invalid_argument() {
        let s = Store::new(10);
        let not_utf8 = URL_SAFE_NO_PAD.encode([0xff, 0xfe]);
        for token in ["!!!", "a", not_utf8.as_str()] {
            match s.list("ns", &query("", 10, Some(token.into()))) {
                Err(Error::InvalidArgument(v)) => assert_eq!(v[0].field, "page_token"),
                other => panic!("{token}: want InvalidArgument, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn token_before_the_prefix_starts_at_the_prefix() {
        let s = Store::new(10);
        for k in ["a", "p/1", "p/2"] {
            s.put("ns", k, b(k), None).unwrap();
        }
        let token = Some(URL_SAFE_NO_PAD.encode("a"));
        assert_eq!(
            keys(&s.list("ns", &query("p/", 10, token)).unwrap()),
            ["p/1", "p/2"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_keys_is_enforced_for_new_keys_only() {
        let s = Store::new(2);
        s.put("ns", "a", b("1"), None).unwrap();
        s.put("other", "a", b("1"), None).unwrap();
        match s.put("ns", "c", b("1"), None) {
            Err(Error::ResourceExhausted(msg)) => {
                assert!(msg.contains("limit of 2 keys"), "{msg}");
                assert!(msg.contains("max_keys"), "{msg}");
            }
            other => panic!("want ResourceExhausted, got {other:?}"),
        }
        // Overwriting an existing key needs no room.
        s.put("ns", "a", b("2"), Some(Duration::from_secs(1)))
            .unwrap();
        // Expired keys make room, even before the sweeper ran.
        advance(Duration::from_secs(1)).await;
        s.put("ns", "c", b("1"), None).unwrap();
        // So do deleted ones.
        assert!(s.delete("other", "a"));
        s.put("ns", "d", b("1"), None).unwrap();
        assert_eq!(s.stored(), 2);
    }
}
