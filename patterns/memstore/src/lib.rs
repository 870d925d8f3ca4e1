//! memstore: an in-memory key-value and pub/sub pattern, and the model to
//! copy when writing a new one. [`MemStore`] implements the SDK's traits by
//! delegating to [`Store`] (the map, in `store.rs`) and [`Topics`] (pub/sub,
//! in `topics.rs`), and runs one background task that purges expired keys.
//! Everything else — protocol, validation, health, shutdown — is the SDK's.

mod records;
mod store;
mod topics;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pattern_sdk::idempotency::{Once, Outcome};
use pattern_sdk::{
    Error, FieldViolation, InitContext, KeyValue, ListPage, ListQuery, MessageStream, Pattern,
    PubSub,
};
use records::{Answer, Records};
use serde::Deserialize;
use tokio::task::AbortHandle;

pub use store::Store;
pub use topics::Topics;

/// The `config:` block of a memstore entry in the proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The most keys held at once, over all namespaces. A put of a new key
    /// beyond it fails with `RESOURCE_EXHAUSTED`.
    pub max_keys: usize,
    /// How often expired keys are purged from memory, e.g. "1s" or "500ms".
    /// (Expired keys are invisible at once either way.)
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Pub/sub: messages held for each subscriber before it starts missing
    /// the oldest (fan-out) or its queue group skips it.
    pub subscriber_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
            sweep_interval: Duration::from_secs(1),
            subscriber_buffer: 1024,
        }
    }
}

pub struct MemStore {
    store: Arc<Store>,
    topics: Arc<Topics>,
    records: Arc<Records>,
    sweeper: AbortHandle,
}

impl Pattern for MemStore {
    type Config = Config;
    const NAME: &'static str = "memstore";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// The data lives in this process's memory: replicas would each hold
    /// their own, so the proxy runs exactly one.
    const STATEFUL: bool = true;

    async fn init(config: Config, _ctx: InitContext) -> Result<Self, Error> {
        let mut problems = Vec::new();
        if config.max_keys == 0 {
            problems.push(FieldViolation::new("config.max_keys", "must be at least 1"));
        }
        if config.sweep_interval.is_zero() {
            problems.push(FieldViolation::new(
                "config.sweep_interval",
                "must be longer than zero, e.g. \"1s\"",
            ));
        }
        if config.subscriber_buffer == 0 {
            problems.push(FieldViolation::new(
                "config.subscriber_buffer",
                "must be at least 1, e.g. 1024",
            ));
        }
        if !problems.is_empty() {
            return Err(Error::InvalidArgument(problems));
        }
        let store = Arc::new(Store::new(config.max_keys));
        let records = Arc::new(Records::new(config.max_keys));
        let sweeper = tokio::spawn(sweep(
            Arc::clone(&store),
            Arc::clone(&records),
            config.sweep_interval,
        ));
        Ok(Self {
            store,
            records,
            topics: Topics::new(config.subscriber_buffer),
            sweeper: sweeper.abort_handle(),
        })
    }

    async fn stop(&self) {
        self.sweeper.abort();
    }
}

impl Drop for MemStore {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

/// Purges expired keys and idempotency records every `every`, until aborted.
async fn sweep(store: Arc<Store>, records: Arc<Records>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let purged = store.purge_expired();
        let forgotten = records.purge_expired();
        if purged + forgotten > 0 {
            tracing::debug!(
                purged,
                forgotten,
                "purged expired keys and idempotency records"
            );
        }
    }
}

impl KeyValue for MemStore {
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, Error> {
        Ok(self.store.get(namespace, key))
    }

    async fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        self.store.put(namespace, key, value, ttl)
    }

    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, Error> {
        Ok(self.store.delete(namespace, key))
    }

    async fn put_once(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        once: &Once,
    ) -> Result<Outcome<()>, Error> {
        let done = self.records.once(namespace, once, || {
            self.store
                .put(namespace, key, value, ttl)
                .map(|()| Answer::Put)
        })?;
        records::outcome(done, |a| (a == Answer::Put).then_some(()))
    }

    async fn delete_once(
        &self,
        namespace: &str,
        key: &str,
        once: &Once,
    ) -> Result<Outcome<bool>, Error> {
        let done = self.records.once(namespace, once, || {
            Ok(Answer::Deleted(self.store.delete(namespace, key)))
        })?;
        records::outcome(done, |a| match a {
            Answer::Deleted(d) => Some(d),
            _ => None,
        })
    }

    async fn list(&self, namespace: &str, query: ListQuery) -> Result<ListPage, Error> {
        self.store.list(namespace, &query)
    }
}

impl PubSub for MemStore {
    async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
    ) -> Result<String, Error> {
        Ok(self.topics.publish(namespace, topic, payload, attributes))
    }

    async fn publish_once(
        &self,
        namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
        once: &Once,
    ) -> Result<Outcome<String>, Error> {
        let done = self.records.once(namespace, once, || {
            let id = self.topics.publish(namespace, topic, payload, attributes);
            Ok(Answer::Published(id))
        })?;
        records::outcome(done, |a| match a {
            Answer::Published(id) => Some(id),
            _ => None,
        })
    }

    async fn subscribe(
        &self,
        namespace: &str,
        topic: &str,
        queue_group: Option<String>,
    ) -> Result<MessageStream, Error> {
        Ok(self.topics.subscribe(namespace, topic, queue_group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<Config, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn config_defaults_and_durations() {
        let c = config("{}").unwrap();
        assert_eq!(c.max_keys, 1_000_000);
        assert_eq!(c.sweep_interval, Duration::from_secs(1));
        let c = config(r#"{"max_keys": 5, "sweep_interval": "250ms"}"#).unwrap();
        assert_eq!(c.max_keys, 5);
        assert_eq!(c.sweep_interval, Duration::from_millis(250));
        assert!(config(r#"{"max_kyes": 5}"#).is_err());
        assert!(config(r#"{"sweep_interval": "soon"}"#).is_err());
    }

    #[tokio::test]
    async fn init_reports_every_bad_field() {
        let bad = Config {
            max_keys: 0,
            sweep_interval: Duration::ZERO,
            subscriber_buffer: 0,
        };
        match MemStore::init(bad, InitContext::new("m")).await {
            Err(Error::InvalidArgument(v)) => {
                let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(
                    fields,
                    [
                        "config.max_keys",
                        "config.sweep_interval",
                        "config.subscriber_buffer"
                    ]
                );
            }
            Err(other) => panic!("want InvalidArgument, got {other:?}"),
            Ok(_) => panic!("want InvalidArgument, got a store"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_purges_until_stopped() {
        let m = MemStore::init(Config::default(), InitContext::new("m"))
            .await
            .unwrap();
        m.put(
            "ns",
            "k",
            Bytes::from_static(b"v"),
            Some(Duration::from_millis(500)),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // Purged by the sweeper, so a direct purge finds nothing left.
        assert_eq!(m.store.purge_expired(), 0);
        m.stop().await;
        tokio::task::yield_now().await;
        assert!(m.sweeper.is_finished());
    }
}
