//! A tiny pattern for the SDK's own unit tests.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prost_types::value::Kind;
use serde::Deserialize;
use trellis_proto::PATTERN_PROTOCOL_VERSION;
use trellis_proto::pattern::v1::InitializeRequest;

use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;

use crate::{
    Error, InitContext, KeyValue, ListPage, ListQuery, Message, MessageStream, Pattern, PubSub,
};

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TestConfig {
    limit: u64,
    /// `init` never returns.
    hang: bool,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self {
            limit: 10,
            hang: false,
        }
    }
}

pub(crate) struct TestPattern {
    pub(crate) name: String,
    map: Mutex<BTreeMap<String, Bytes>>,
    /// Every published message, whatever its namespace and topic.
    messages: broadcast::Sender<Message>,
    next_id: AtomicU64,
}

impl TestPattern {
    /// Live subscriptions.
    pub(crate) fn subscribers(&self) -> usize {
        self.messages.receiver_count()
    }
}

impl Pattern for TestPattern {
    type Config = TestConfig;
    const NAME: &'static str = "test-pattern";
    const VERSION: &'static str = "9.9.9";

    async fn init(config: TestConfig, ctx: InitContext) -> Result<Self, Error> {
        if config.limit == 0 {
            return Err(Error::invalid_argument(
                "config.limit",
                "must be at least 1",
            ));
        }
        if config.hang {
            std::future::pending::<()>().await;
        }
        // One backend operation, so tests can see the context's metrics.
        let _: Result<(), Error> = ctx.backend("test").call("INIT", async { Ok(()) }).await;
        Ok(Self {
            name: ctx.name().to_string(),
            map: Mutex::default(),
            messages: broadcast::Sender::new(16),
            next_id: AtomicU64::new(1),
        })
    }
}

impl KeyValue for TestPattern {
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, Error> {
        let map = self.map.lock().map_err(Error::internal)?;
        Ok(map.get(&format!("{namespace}/{key}")).cloned())
    }

    async fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        _ttl: Option<Duration>,
    ) -> Result<(), Error> {
        if key == "boom" {
            return Err(Error::internal("secret detail"));
        }
        let mut map = self.map.lock().map_err(Error::internal)?;
        map.insert(format!("{namespace}/{key}"), value);
        Ok(())
    }

    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, Error> {
        let mut map = self.map.lock().map_err(Error::internal)?;
        Ok(map.remove(&format!("{namespace}/{key}")).is_some())
    }

    async fn list(&self, namespace: &str, query: ListQuery) -> Result<ListPage, Error> {
        let map = self.map.lock().map_err(Error::internal)?;
        let start = format!("{namespace}/{}", query.prefix);
        let entries = map
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .take(query.page_size)
            .map(|(k, v)| (k[namespace.len() + 1..].to_string(), v.clone()))
            .collect();
        Ok(ListPage {
            entries,
            next_page_token: query.page_token.map(|t| format!("after-{t}")),
        })
    }
}

impl PubSub for TestPattern {
    async fn publish(
        &self,
        _namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
    ) -> Result<String, Error> {
        if topic == "boom" {
            return Err(Error::internal("secret detail"));
        }
        let message_id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        // No subscriber is not an error: the message is simply not delivered.
        let _ = self.messages.send(Message {
            message_id: message_id.clone(),
            topic: topic.to_string(),
            payload,
            attributes,
            publish_time: SystemTime::now(),
        });
        Ok(message_id)
    }

    /// Every message on `topic` (namespaces and queue groups are ignored); a
    /// message with payload "fail" becomes an `UNAVAILABLE` item.
    async fn subscribe(
        &self,
        _namespace: &str,
        topic: &str,
        _queue_group: Option<String>,
    ) -> Result<MessageStream, Error> {
        let topic = topic.to_string();
        let stream = BroadcastStream::new(self.messages.subscribe()).filter_map(move |m| match m {
            Ok(m) if m.topic != topic => None,
            Ok(m) if m.payload == "fail" => Some(Err(Error::unavailable("backend failed"))),
            Ok(m) => Some(Ok(m)),
            Err(_lagged) => None,
        });
        Ok(Box::pin(stream))
    }
}

/// An `Initialize` for "cache" at protocol version 1 with these config fields.
pub(crate) fn initialize_request(fields: &[(&str, Kind)]) -> InitializeRequest {
    let fields = fields
        .iter()
        .map(|(k, v)| {
            let value = prost_types::Value {
                kind: Some(v.clone()),
            };
            (k.to_string(), value)
        })
        .collect();
    InitializeRequest {
        name: "cache".into(),
        config: Some(prost_types::Struct { fields }),
        protocol_version: PATTERN_PROTOCOL_VERSION,
    }
}
