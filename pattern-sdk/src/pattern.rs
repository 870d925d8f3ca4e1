//! The traits a pattern implements: [`Pattern`] for its life cycle, and one
//! trait per data interface ([`KeyValue`], [`PubSub`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio_stream::Stream;

use crate::Error;
use crate::idempotency::{Once, Outcome};
use crate::observe::{Backend, Metrics, Pool, PoolStatus};

/// A pattern's life cycle. The SDK creates the pattern with [`Pattern::init`]
/// when the proxy calls `Lifecycle/Initialize`, polls [`Pattern::health`]
/// four times a second once started, and calls [`Pattern::stop`] once, after
/// in-flight requests have drained.
///
/// Implementations may write `async fn` for each method.
pub trait Pattern: Sized + Send + Sync + 'static {
    /// The pattern's configuration: the `config:` block of its proxy entry.
    /// An absent block deserializes from `{}`, so give the struct
    /// `#[serde(default, deny_unknown_fields)]`.
    type Config: DeserializeOwned + Send;

    /// The implementation's name, reported in `InitializeResponse.name`.
    const NAME: &'static str;

    /// The implementation's own version (not the protocol version), e.g.
    /// `env!("CARGO_PKG_VERSION")`.
    const VERSION: &'static str;

    /// Whether the pattern keeps its data in its own process (an in-memory
    /// store), reported in `InitializeResponse.stateful`. Replicas of such a
    /// pattern would each hold different data, so the proxy refuses
    /// `replicas:` above 1 for it. Leave it `false` when the data lives in a
    /// backend every process reaches (redis, postgres, nats).
    const STATEFUL: bool = false;

    /// Validates the configuration and builds the pattern: connect to
    /// backends, spawn background tasks. Return [`Error::InvalidArgument`]
    /// naming the field (e.g. `config.max_keys`) for a bad configuration: the
    /// proxy then marks the pattern failed and does not restart it.
    fn init(
        config: Self::Config,
        ctx: InitContext,
    ) -> impl Future<Output = Result<Self, Error>> + Send;

    /// Whether the pattern can serve right now; polled every 250 ms after
    /// `Start`, each call bounded by 1 s. Answer [`Health::NotServing`] while a backend is unreachable.
    fn health(&self) -> impl Future<Output = Health> + Send {
        async { Health::Serving }
    }

    /// Releases resources: end background tasks, close connections. Called
    /// once, after in-flight requests finished or the grace period ran out.
    fn stop(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What the SDK knows when it creates the pattern, and where the pattern
/// gets its metric handles ([`crate::observe`]).
#[derive(Clone)]
#[non_exhaustive]
pub struct InitContext {
    name: String,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for InitContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitContext")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl InitContext {
    /// For tests of a pattern's `init`: its metrics are recorded but served
    /// nowhere.
    pub fn new(name: impl Into<String>) -> Self {
        Self::with_metrics(name, Arc::new(Metrics::new()))
    }

    pub(crate) fn with_metrics(name: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            name: name.into(),
            metrics,
        }
    }

    /// The pattern's name in the proxy configuration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The handle that measures operations against the backend
    /// `system` (its OpenTelemetry `db.system.name`: `redis`,
    /// `postgresql`, `nats`, …); keep it and run every backend call through
    /// [`Backend::call`](crate::observe::Backend::call).
    pub fn backend(&self, system: &'static str) -> Backend {
        self.metrics.backend(system)
    }

    /// Exports the pattern's connection pool: `status` is called at every
    /// scrape and must be quick and non-blocking (e.g. deadpool's
    /// `Pool::status()`); the returned handle counts waits and timeouts.
    /// A pattern has one pool: a second call replaces the first.
    pub fn pool(&self, status: impl Fn() -> PoolStatus + Send + Sync + 'static) -> Pool {
        self.metrics.pool(status)
    }

    /// What `Lifecycle/Metrics` answers now: the text exposition of
    /// everything recorded through this context. For a pattern's tests.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }
}

/// A pattern's answer to a health poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// Not able to serve; the reason is logged when the state changes.
    NotServing(String),
}

/// The `trellis.data.v1.KeyValue` interface, in plain Rust types. Every
/// argument has been validated by the SDK (see [`crate::validate`]): namespace
/// and key are non-empty, keys are at most 1024 bytes without NUL, values at
/// most 1 MiB, and a `ttl` is positive when present.
pub trait KeyValue: Pattern {
    /// The live value under `key`, or `None` if it is missing or expired.
    fn get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Bytes>, Error>> + Send;

    /// Stores `value` under `key`, replacing any previous value and TTL.
    /// `ttl: None` means the key never expires.
    fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Removes `key`; `true` if a live key was removed, `false` if there was
    /// nothing to delete.
    fn delete(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// [`put`](Self::put) once per idempotency key (see
    /// [`crate::idempotency`]): in one atomic step, if `(namespace,
    /// once.key)` has a live record, answer [`Outcome::Replayed`] when its
    /// fingerprint is `once.fingerprint` and [`Outcome::Reused`] when not,
    /// without writing; else write and record the fingerprint for
    /// `once.retention`, and answer [`Outcome::Executed`]. A write that
    /// fails records nothing. The default refuses every key.
    fn put_once(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        once: &Once,
    ) -> impl Future<Output = Result<Outcome<()>, Error>> + Send {
        let _ = (namespace, key, value, ttl, once);
        async { Err(crate::idempotency::unsupported(Self::NAME)) }
    }

    /// [`delete`](Self::delete) once per idempotency key, as
    /// [`put_once`](Self::put_once): the record keeps whether a live key
    /// was removed, so a replay answers `deleted` as the first call did.
    fn delete_once(
        &self,
        namespace: &str,
        key: &str,
        once: &Once,
    ) -> impl Future<Output = Result<Outcome<bool>, Error>> + Send {
        let _ = (namespace, key, once);
        async { Err(crate::idempotency::unsupported(Self::NAME)) }
    }

    /// One page of the live entries whose keys start with `query.prefix`, in
    /// ascending key order.
    fn list(
        &self,
        namespace: &str,
        query: ListQuery,
    ) -> impl Future<Output = Result<ListPage, Error>> + Send;
}

/// A validated `List` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only keys starting with this; empty matches every key.
    pub prefix: String,
    /// How many entries to return at most: already defaulted (0 → 100) and
    /// capped (at 1000) by the SDK, so always in `1..=1000`.
    pub page_size: usize,
    /// The `next_page_token` of a previous page, as the pattern made it.
    /// `None` for the first page. It came from outside: a token the pattern
    /// cannot decode is `Error::invalid_argument("page_token", …)`.
    pub page_token: Option<String>,
}

/// One page of a `List` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// `(key, value)` pairs in ascending key order.
    pub entries: Vec<(String, Bytes)>,
    /// `Some` when more entries may follow; the caller passes it back as
    /// `page_token`. `None` when this is the last page.
    pub next_page_token: Option<String>,
}

impl ListPage {
    /// Builds one page from `candidates` (the matching entries from the
    /// cursor on, in ascending key order): it ends at `page_size` entries
    /// or before the entry that would take it past
    /// [`MAX_PAGE_BYTES`](crate::validate::MAX_PAGE_BYTES) of keys and
    /// values (it always holds at least one), so it fits one gRPC message.
    /// If candidates remain, the token is `token(last key on the page)`.
    /// Reads at most one candidate past the page.
    pub fn fill(
        candidates: impl IntoIterator<Item = (String, Bytes)>,
        page_size: usize,
        token: impl FnOnce(&str) -> String,
    ) -> ListPage {
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for (key, value) in candidates {
            let size = key.len() + value.len();
            if entries.len() == page_size
                || (!entries.is_empty() && bytes + size > crate::validate::MAX_PAGE_BYTES)
            {
                more = true;
                break;
            }
            bytes += size;
            entries.push((key, value));
        }
        let next_page_token = match entries.last() {
            Some((last, _)) if more => Some(token(last)),
            _ => None,
        };
        ListPage {
            entries,
            next_page_token,
        }
    }
}

/// The `trellis.data.v1.PubSub` interface, in plain Rust types. Every argument
/// has been validated by the SDK (see [`crate::validate`]): namespace and
/// topic are non-empty, topics and queue groups are at most 256 bytes of
/// ASCII letters, digits and `.` `_` `-` `~`, payloads at most 1 MiB, and
/// attributes within their limits (no key starts with `trellis-`).
///
/// Delivery is at-most-once to live subscribers, with no replay; see
/// `proto/trellis/data/v1/pubsub.proto` for the whole contract.
pub trait PubSub: Pattern {
    /// Sends one message to `topic` and returns the id it was given, once
    /// the backend has accepted it. Answer [`Error::Unavailable`] when the
    /// backend cannot take it now, promptly rather than after a long wait.
    fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<String, Error>> + Send;

    /// [`publish`](Self::publish) once per idempotency key (see
    /// [`crate::idempotency`]): the record keeps the message id, so a
    /// replay answers the same id and publishes nothing. A backend that
    /// cannot claim, publish and record atomically claims the key first
    /// (answering [`Outcome::InUse`] to a duplicate meanwhile, with a lease
    /// so a crash does not hold it forever), or keeps this default, which
    /// refuses every key.
    fn publish_once(
        &self,
        namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
        once: &Once,
    ) -> impl Future<Output = Result<Outcome<String>, Error>> + Send {
        let _ = (namespace, topic, payload, attributes, once);
        async { Err(crate::idempotency::unsupported(Self::NAME)) }
    }

    /// Subscribes to `topic`: fan-out when `queue_group` is `None`, otherwise
    /// load-shared among the group's members. Return once the subscription
    /// is established (messages published after this returns are
    /// delivered), with a stream of the messages. The SDK drops the stream
    /// when the client goes away or the pattern shuts down, and dropping it
    /// must end the backend subscription. An `Err` item ends the stream
    /// (e.g. [`Error::Unavailable`] when the backend connection is gone for
    /// good).
    fn subscribe(
        &self,
        namespace: &str,
        topic: &str,
        queue_group: Option<String>,
    ) -> impl Future<Output = Result<MessageStream, Error>> + Send;
}

/// The messages of one subscription, as [`PubSub::subscribe`] returns them.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<Message, Error>> + Send + 'static>>;

/// One message, as a subscriber receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The id [`PubSub::publish`] returned for it.
    pub message_id: String,
    /// The topic it was published to.
    pub topic: String,
    pub payload: Bytes,
    pub attributes: BTreeMap<String, String>,
    /// When the pattern accepted it.
    pub publish_time: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{MAX_PAGE_BYTES, MAX_VALUE_BYTES};

    fn entries(n: usize, value_len: usize) -> Vec<(String, Bytes)> {
        (0..n)
            .map(|i| (format!("k{i}"), Bytes::from(vec![b'v'; value_len])))
            .collect()
    }

    fn token(last: &str) -> String {
        format!("after:{last}")
    }

    #[test]
    fn a_page_ends_at_page_size_with_a_token_for_the_rest() {
        let page = ListPage::fill(entries(5, 1), 3, token);
        let keys: Vec<&str> = page.entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["k0", "k1", "k2"]);
        assert_eq!(page.next_page_token.as_deref(), Some("after:k2"));
    }

    #[test]
    fn the_last_page_has_no_token() {
        let page = ListPage::fill(entries(3, 1), 3, token);
        assert_eq!(page.entries.len(), 3);
        assert_eq!(page.next_page_token, None);
    }

    #[test]
    fn a_page_ends_before_max_page_bytes_but_holds_at_least_one_entry() {
        let page = ListPage::fill(entries(5, MAX_VALUE_BYTES), 10, token);
        let bytes: usize = page.entries.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(page.entries.len(), MAX_PAGE_BYTES / (MAX_VALUE_BYTES + 2));
        assert!(bytes <= MAX_PAGE_BYTES);
        assert!(page.next_page_token.is_some());

        let huge = vec![("k".to_string(), Bytes::from(vec![0; MAX_PAGE_BYTES + 1]))];
        assert_eq!(ListPage::fill(huge, 10, token).entries.len(), 1);
    }
}
