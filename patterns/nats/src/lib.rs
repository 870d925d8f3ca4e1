//! trellis-nats: the `trellis.data.v1.PubSub` interface on core NATS,
//! written only against `pattern-sdk` and `async-nats`. One NATS connection
//! per pattern process carries every publish and subscription.
//!
//! - Subjects: `{subject_prefix}.{namespace}.{topic}`, namespace and topic
//!   escaped so they cannot collide (see `subject.rs`).
//! - Queue groups: NATS queue subscriptions (the group name escaped the same
//!   way).
//! - Attributes: NATS headers. The message id (a UUID v4) and the publish
//!   time travel in the headers `Trellis-Message-Id` and
//!   `Trellis-Publish-Time` (Unix nanoseconds).
//! - Health: `NOT_SERVING` whenever the connection is not `Connected`.
//!   async-nats reconnects on its own (forever, backing off up to 4 s) and
//!   re-subscribes every live subscription once it is back.
//! - Metrics and spans: each publish and each subscribe runs through the
//!   SDK's [`Backend`] (`PUBLISH`, `SUBSCRIBE`; refused while disconnected
//!   counts as an error); the SDK counts open subscriptions.
//!
//! What is lost while the server is unreachable is in README.md.

pub mod subject;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::client::PublishErrorKind;
use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, HeaderMap, HeaderName, HeaderValue, ServerAddr};
use bytes::Bytes;
use futures::StreamExt;
use pattern_sdk::observe::Backend;
use pattern_sdk::{
    Error, FieldViolation, Health, InitContext, Message, MessageStream, Pattern, PubSub,
};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::Instrument;

/// The header carrying the message id.
pub const MESSAGE_ID_HEADER: &str = "Trellis-Message-Id";
/// The header carrying the publish time, in nanoseconds since the Unix epoch.
pub const PUBLISH_TIME_HEADER: &str = "Trellis-Publish-Time";

/// The `config:` block of a trellis-nats entry in the proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The NATS server, e.g. "nats://127.0.0.1:4222" (user:password@ and
    /// tls:// work as in any NATS client).
    pub url: String,
    /// The first subject tokens of every subject this pattern uses.
    pub subject_prefix: String,
    /// How long one connection attempt may take, and the longest a publish
    /// waits for room in the publish buffer, e.g. "5s".
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Messages (and subscription commands) queued inside the client on
    /// their way to the server.
    pub publish_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "trellis".into(),
            connect_timeout: Duration::from_secs(5),
            publish_buffer: 2048,
        }
    }
}

impl Config {
    /// Every problem at once, each naming its field.
    fn validate(&self) -> Result<ServerAddr, Error> {
        let mut problems = Vec::new();
        let addr = ServerAddr::from_str(&self.url)
            .map_err(|e| {
                problems.push(FieldViolation::new(
                    "config.url",
                    format!(
                        "{:?} is not a NATS server address ({e}); use e.g. \
                         \"nats://127.0.0.1:4222\"",
                        self.url
                    ),
                ))
            })
            .ok();
        if !subject::valid_prefix(&self.subject_prefix) {
            problems.push(FieldViolation::new(
                "config.subject_prefix",
                format!(
                    "{:?} is not allowed; use {}",
                    self.subject_prefix,
                    subject::PREFIX_RULE
                ),
            ));
        }
        if self.connect_timeout.is_zero() {
            problems.push(FieldViolation::new(
                "config.connect_timeout",
                "must be longer than zero, e.g. \"5s\"",
            ));
        }
        if self.publish_buffer == 0 {
            problems.push(FieldViolation::new(
                "config.publish_buffer",
                "must be at least 1, e.g. 2048",
            ));
        }
        match addr {
            Some(addr) if problems.is_empty() => Ok(addr),
            _ => Err(Error::InvalidArgument(problems)),
        }
    }
}

pub struct Nats {
    client: Client,
    /// The configured URL with any password hidden, for messages.
    server: String,
    prefix: String,
    wait: Duration,
    /// Times and traces every publish and subscribe.
    backend: Backend,
}

impl Pattern for Nats {
    type Config = Config;
    const NAME: &'static str = "nats";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    /// Starts connecting and waits up to `connect_timeout` for the first
    /// connection. If the server is not there yet the pattern still starts,
    /// `NOT_SERVING` until the client gets through: a backend outage is not
    /// a reason to crash-loop.
    async fn init(config: Config, ctx: InitContext) -> Result<Self, Error> {
        let addr = config.validate()?;
        let server = redact(&config.url);
        let (connected_tx, mut connected) = watch::channel(false);
        let connected_tx = Arc::new(connected_tx);
        let log_server = server.clone();
        let client = ConnectOptions::new()
            .name(format!("trellis-nats/{}", ctx.name()))
            .connection_timeout(config.connect_timeout)
            .client_capacity(config.publish_buffer)
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let connected_tx = Arc::clone(&connected_tx);
                let server = log_server.clone();
                async move {
                    match &event {
                        Event::Connected => {
                            connected_tx.send_replace(true);
                            tracing::info!(%server, "connected to NATS");
                        }
                        Event::Disconnected => {
                            connected_tx.send_replace(false);
                            tracing::warn!(%server, "disconnected from NATS; reconnecting");
                        }
                        Event::SlowConsumer(sid) => tracing::warn!(
                            sid,
                            "a subscriber is too slow: NATS messages for it were dropped"
                        ),
                        other => tracing::info!(%server, event = %other, "NATS event"),
                    }
                }
            })
            .connect(addr)
            .await
            .map_err(|e| {
                Error::unavailable(format!("cannot start the NATS client for {server}: {e}"))
            })?;
        if tokio::time::timeout(config.connect_timeout, connected.wait_for(|c| *c))
            .await
            .is_err()
        {
            tracing::warn!(
                %server,
                timeout = ?config.connect_timeout,
                "NATS is not reachable yet; NOT_SERVING until the client connects \
                 (start nats-server or fix config.url)"
            );
        }
        Ok(Self {
            client,
            server,
            prefix: config.subject_prefix,
            wait: config.connect_timeout,
            backend: ctx.backend("nats"),
        })
    }

    async fn health(&self) -> Health {
        match self.client.connection_state() {
            State::Connected => Health::Serving,
            state => Health::NotServing(self.not_connected(&state)),
        }
    }

    /// Unsubscribes everything, flushes what is buffered and closes.
    async fn stop(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::warn!(error = %e, "could not drain the NATS connection");
        }
    }
}

impl Nats {
    fn not_connected(&self, state: &State) -> String {
        format!(
            "the connection to NATS at {} is {state}; the client reconnects on its own. \
             Check that nats-server is running there, or fix config.url",
            self.server
        )
    }

    /// `UNAVAILABLE` unless connected: without a connection a publish would
    /// sit in the client's buffer and a subscription would not exist yet.
    fn connected(&self) -> Result<(), Error> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            state => Err(Error::unavailable(format!(
                "{}; retry with backoff",
                self.not_connected(&state)
            ))),
        }
    }
}

impl PubSub for Nats {
    async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
    ) -> Result<String, Error> {
        let message_id = uuid::Uuid::new_v4().to_string();
        let headers = headers(&message_id, SystemTime::now(), attributes)?;
        let measured = self.backend.start("PUBLISH");
        if let Err(e) = self.connected() {
            measured.error("not_connected");
            return Err(e);
        }
        let subject = subject::subject(&self.prefix, namespace, topic);
        let size = payload.len();
        let publish = self
            .client
            .publish_with_headers(subject, headers, payload)
            .instrument(measured.span().clone());
        let Ok(sent) = tokio::time::timeout(self.wait, publish).await else {
            measured.error("timeout");
            return Err(Error::unavailable(format!(
                "the NATS client's publish buffer stayed full for {:?} (is {} slow or \
                 unreachable?); retry with backoff, or raise config.publish_buffer",
                self.wait, self.server
            )));
        };
        match sent {
            Ok(()) => {
                measured.ok();
                Ok(message_id)
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                measured.error("max_payload_exceeded");
                Err(Error::invalid_argument(
                    "payload",
                    format!(
                        "is {size} bytes; with its attributes and Trellis headers it exceeds \
                         the NATS server's max_payload of {} bytes ({e}); send less, or raise \
                         max_payload in the nats-server configuration",
                        self.client.max_payload()
                    ),
                ))
            }
            Err(e) => {
                measured.error("publish_failed");
                Err(Error::unavailable(format!(
                    "NATS did not take the message: {e}; retry with backoff"
                )))
            }
        }
    }

    async fn subscribe(
        &self,
        namespace: &str,
        topic: &str,
        queue_group: Option<String>,
    ) -> Result<MessageStream, Error> {
        let measured = self.backend.start("SUBSCRIBE");
        if let Err(e) = self.connected() {
            measured.error("not_connected");
            return Err(e);
        }
        let subject = subject::subject(&self.prefix, namespace, topic);
        let subscribe = async {
            match queue_group {
                Some(group) => {
                    self.client
                        .queue_subscribe(subject, subject::token(&group))
                        .await
                }
                None => self.client.subscribe(subject).await,
            }
        };
        let subscriber = match subscribe.instrument(measured.span().clone()).await {
            Ok(subscriber) => {
                measured.ok();
                subscriber
            }
            Err(e) => {
                measured.error("subscribe_failed");
                return Err(Error::unavailable(format!(
                    "cannot subscribe on NATS: {e}; retry with backoff"
                )));
            }
        };
        // Dropping the `Subscriber` unsubscribes it on the server.
        let topic = topic.to_string();
        Ok(Box::pin(subscriber.map(move |m| Ok(message(&topic, m)))))
    }
}

/// The NATS headers of a message: id, publish time, then the attributes.
fn headers(
    message_id: &str,
    publish_time: SystemTime,
    attributes: BTreeMap<String, String>,
) -> Result<HeaderMap, Error> {
    let nanos = publish_time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut headers = HeaderMap::new();
    headers.insert(MESSAGE_ID_HEADER, header_value("message id", message_id)?);
    headers.insert(PUBLISH_TIME_HEADER, HeaderValue::from(nanos as u64));
    let mut problems = Vec::new();
    for (key, value) in attributes {
        let field = format!("attributes[{key:?}]");
        if key
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
        {
            problems.push(FieldViolation::new(
                field,
                "keys starting with \"Nats-\" are NATS's own headers (JetStream acts on them); \
                 rename the attribute",
            ));
            continue;
        }
        match (HeaderName::from_str(&key), HeaderValue::from_str(&value)) {
            (Ok(name), Ok(value)) => headers.insert(name, value),
            _ => problems.push(FieldViolation::new(
                field,
                "cannot be a NATS header; use the characters the SDK allows",
            )),
        }
    }
    if problems.is_empty() {
        Ok(headers)
    } else {
        Err(Error::InvalidArgument(problems))
    }
}

fn header_value(what: &str, value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value).map_err(|e| Error::internal(format!("{what} {value:?}: {e}")))
}

/// A NATS message as the SDK's [`Message`]. A message published straight to
/// the subject by a NATS client (not through Trellis) has no Trellis
/// headers: it gets a fresh id and the time it arrived.
fn message(topic: &str, m: async_nats::Message) -> Message {
    let mut attributes = BTreeMap::new();
    let mut message_id = None;
    let mut publish_time = None;
    if let Some(headers) = &m.headers {
        for (name, values) in headers.iter() {
            let Some(value) = values.last() else { continue };
            let name: &str = name.as_ref();
            if name.eq_ignore_ascii_case(MESSAGE_ID_HEADER) {
                message_id = Some(value.as_str().to_string());
            } else if name.eq_ignore_ascii_case(PUBLISH_TIME_HEADER) {
                publish_time = value
                    .as_str()
                    .parse::<u64>()
                    .ok()
                    .map(|n| UNIX_EPOCH + Duration::from_nanos(n));
            } else {
                attributes.insert(name.to_string(), value.as_str().to_string());
            }
        }
    }
    Message {
        message_id: message_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        topic: topic.to_string(),
        payload: m.payload,
        attributes,
        publish_time: publish_time.unwrap_or_else(SystemTime::now),
    }
}

/// The URL without its password, for logs and error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
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
        assert_eq!(c.url, "nats://127.0.0.1:4222");
        assert_eq!(c.subject_prefix, "trellis");
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.publish_buffer, 2048);
        let c = config(r#"{"url": "nats://h:1", "connect_timeout": "250ms"}"#).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert!(config(r#"{"urll": "x"}"#).is_err());
    }

    #[test]
    fn every_bad_field_is_reported() {
        let bad = Config {
            url: "nats://[::1".into(),
            subject_prefix: "a.>".into(),
            connect_timeout: Duration::ZERO,
            publish_buffer: 0,
        };
        match bad.validate() {
            Err(Error::InvalidArgument(v)) => {
                let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(
                    fields,
                    [
                        "config.url",
                        "config.subject_prefix",
                        "config.connect_timeout",
                        "config.publish_buffer"
                    ]
                );
            }
            other => panic!("want InvalidArgument, got {other:?}"),
        }
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn headers_carry_id_time_and_attributes_and_come_back() {
        let at = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let attributes = BTreeMap::from([("trace-id".to_string(), "abc é".to_string())]);
        let headers = headers("id-1", at, attributes.clone()).unwrap();
        let m = async_nats::Message {
            subject: "trellis.ns.t".into(),
            reply: None,
            payload: Bytes::from_static(b"p"),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let m = message("t", m);
        assert_eq!(m.message_id, "id-1");
        assert_eq!(m.publish_time, at);
        assert_eq!(m.attributes, attributes);
        assert_eq!(m.topic, "t");
        assert_eq!(m.payload, Bytes::from_static(b"p"));
    }

    #[test]
    fn a_foreign_message_gets_an_id_and_a_time() {
        let m = async_nats::Message {
            subject: "trellis.ns.t".into(),
            reply: None,
            payload: Bytes::new(),
            headers: None,
            status: None,
            description: None,
            length: 0,
        };
        let m = message("t", m);
        assert!(!m.message_id.is_empty());
        assert!(m.attributes.is_empty());
    }

    #[test]
    fn nats_headers_are_refused_as_attributes() {
        let attributes = BTreeMap::from([("Nats-Msg-Id".to_string(), "x".to_string())]);
        match headers("id", SystemTime::now(), attributes) {
            Err(Error::InvalidArgument(v)) => assert!(v[0].message.contains("Nats-")),
            other => panic!("want InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[tokio::test]
    async fn an_unreachable_server_means_not_serving_and_unavailable_not_a_hang() {
        // A port nothing listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Config {
            url: format!("nats://127.0.0.1:{port}"),
            connect_timeout: Duration::from_millis(200),
            ..Config::default()
        };
        let ctx = InitContext::new("n");
        let nats = Nats::init(c, ctx.clone()).await.unwrap();
        match nats.health().await {
            Health::NotServing(why) => assert!(why.contains(&port.to_string()), "{why}"),
            Health::Serving => panic!("serving without a server"),
        }
        let err = nats
            .publish("ns", "t", Bytes::new(), BTreeMap::new())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let err = nats.subscribe("ns", "t", None).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        let metrics = ctx.metrics_text();
        for op in ["PUBLISH", "SUBSCRIBE"] {
            let want = format!(
                r#"pattern_backend_operation_duration_seconds_count{{operation="{op}",outcome="error"}} 1"#
            );
            assert!(metrics.lines().any(|l| l == want), "{want} in {metrics}");
        }
    }
}
