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
//! - TLS: a `tls:` block (`ca_file`, `cert_file` + `key_file`) or a
//!   `tls://` url makes TLS required; the server's certificate must chain
//!   to the CA (or the system's roots) and name the url's host. A failed
//!   handshake leaves the pattern `NOT_SERVING`, saying so and naming
//!   `config.tls.ca_file`.
//! - Credentials: `user` with `password_file`/`password_env`, or
//!   `token_file`/`token_env` (backend-config); a password in the url
//!   still works and is shown as `***` wherever the url is.
//!
//! What is lost while the server is unreachable is in README.md.

pub mod subject;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::client::PublishErrorKind;
use async_nats::connection::State;
use async_nats::{
    Client, ClientError, ConnectOptions, Event, HeaderMap, HeaderName, HeaderValue, ServerAddr,
};
use backend_config::{Secret, Tls, read_secret, redact_url};
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
    /// TLS (required once the block is there): `ca_file`, and `cert_file`
    /// + `key_file` for mutual TLS.
    pub tls: Option<Tls>,
    /// The user to connect as; its password from `password_file` or
    /// `password_env`.
    pub user: Option<String>,
    /// A file holding `user`'s password.
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding `user`'s password.
    pub password_env: Option<String>,
    /// A file holding the authentication token (instead of a user).
    pub token_file: Option<PathBuf>,
    /// The name of an environment variable holding the token.
    pub token_env: Option<String>,
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
            tls: None,
            user: None,
            password_file: None,
            password_env: None,
            token_file: None,
            token_env: None,
            subject_prefix: "trellis".into(),
            connect_timeout: Duration::from_secs(5),
            publish_buffer: 2048,
        }
    }
}

/// How the pattern authenticates, read from the files and variables the
/// config names.
#[derive(Debug, PartialEq)]
enum Credentials {
    None,
    UserPassword(String, Secret),
    Token(Secret),
}

/// What [`Config::validate`] found good.
#[derive(Debug)]
struct Checked {
    addr: ServerAddr,
    credentials: Credentials,
}

impl Config {
    /// Every problem at once, each naming its field. `lookup` reads the
    /// environment (for `password_env`, `token_env`).
    fn validate(&self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Checked, Error> {
        let mut problems = Vec::new();
        let addr = ServerAddr::from_str(&self.url)
            .map_err(|e| {
                problems.push(FieldViolation::new(
                    "config.url",
                    format!(
                        "{:?} is not a NATS server address ({e}); use e.g. \
                         \"nats://127.0.0.1:4222\" or \"tls://host:4222\"",
                        redact_url(&self.url)
                    ),
                ))
            })
            .ok();
        let credentials = self.credentials(addr.as_ref(), lookup, &mut problems);
        if let Some(Err(v)) = self.tls.as_ref().map(|t| t.load("config.tls")) {
            problems.extend(v);
        }
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
            Some(addr) if problems.is_empty() => Ok(Checked { addr, credentials }),
            _ => Err(Error::InvalidArgument(problems)),
        }
    }

    fn credentials(
        &self,
        addr: Option<&ServerAddr>,
        lookup: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<FieldViolation>,
    ) -> Credentials {
        let mut read = |file: (&str, Option<&std::path::Path>), env: (&str, Option<&str>)| {
            read_secret(file, env, lookup)
                .map_err(|v| problems.push(v))
                .ok()
                .flatten()
        };
        let password = read(
            ("config.password_file", self.password_file.as_deref()),
            ("config.password_env", self.password_env.as_deref()),
        );
        let token = read(
            ("config.token_file", self.token_file.as_deref()),
            ("config.token_env", self.token_env.as_deref()),
        );
        let given = self.user.is_some() || password.is_some() || token.is_some();
        if given && addr.is_some_and(|a| a.username().is_some() || a.password().is_some()) {
            problems.push(FieldViolation::new(
                "config.url",
                "has credentials too; give them either in the url or in user/password_file/\
                 password_env/token_file/token_env",
            ));
        }
        match (&self.user, password, token) {
            (Some(_), _, Some(_)) => {
                problems.push(FieldViolation::new(
                    "config.token_file",
                    "give a token or a user with a password, not both",
                ));
                Credentials::None
            }
            (Some(user), Some(password), None) => Credentials::UserPassword(user.clone(), password),
            (Some(_), None, None) => {
                problems.push(FieldViolation::new(
                    "config.user",
                    "needs its password: set config.password_file or config.password_env",
                ));
                Credentials::None
            }
            (None, Some(_), _) => {
                problems.push(FieldViolation::new(
                    "config.password_file",
                    "a password needs config.user",
                ));
                Credentials::None
            }
            (None, None, Some(token)) => Credentials::Token(token),
            (None, None, None) => Credentials::None,
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
    /// The client's last error while not connected (e.g. "TLS error").
    last_error: Arc<Mutex<Option<String>>>,
    /// With TLS: what to check when the handshake fails.
    tls_hint: Option<String>,
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
        let Checked { addr, credentials } = config.validate(&|name| std::env::var(name).ok())?;
        let server = redact_url(&config.url);
        let tls_hint = (config.tls.is_some() || addr.tls_required())
            .then(|| backend_config::tls_hint("config.tls", config.tls.as_ref(), "config.url"));
        let (connected_tx, mut connected) = watch::channel(false);
        let connected_tx = Arc::new(connected_tx);
        let last_error = Arc::new(Mutex::new(None::<String>));
        let log_server = server.clone();
        let mut options = ConnectOptions::new();
        match credentials {
            Credentials::None => {}
            Credentials::UserPassword(user, password) => {
                options = options.user_and_password(user, password.expose().to_string());
            }
            Credentials::Token(token) => options = options.token(token.expose().to_string()),
        }
        if let Some(tls) = &config.tls {
            options = options.require_tls(true);
            if let Some(ca) = &tls.ca_file {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let events_error = Arc::clone(&last_error);
        let client = options
            .name(format!("trellis-nats/{}", ctx.name()))
            .connection_timeout(config.connect_timeout)
            .client_capacity(config.publish_buffer)
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let connected_tx = Arc::clone(&connected_tx);
                let server = log_server.clone();
                let last_error = Arc::clone(&events_error);
                async move {
                    let last = |e: Option<String>| {
                        *last_error.lock().unwrap_or_else(PoisonError::into_inner) = e;
                    };
                    match &event {
                        Event::ClientError(ClientError::Other(e)) => {
                            last(Some(e.clone()));
                            tracing::info!(%server, error = %e, "cannot connect to NATS; retrying");
                        }
                        Event::Connected => {
                            last(None);
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
        let nats = Self {
            client,
            server,
            prefix: config.subject_prefix,
            wait: config.connect_timeout,
            backend: ctx.backend("nats"),
            last_error,
            tls_hint,
        };
        if tokio::time::timeout(config.connect_timeout, connected.wait_for(|c| *c))
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?config.connect_timeout,
                "NATS is not reachable yet: {}; NOT_SERVING until the client connects",
                nats.not_connected(&nats.client.connection_state())
            );
        }
        Ok(nats)
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
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // async-nats reports a failed handshake as "IO error" or "TLS
        // error", without rustls's reason; a refused connection is an "IO
        // error" too, so the hint says when it applies.
        let (error, hint) = match (&last, &self.tls_hint) {
            (Some(e), Some(hint)) => (
                format!(" (last error: {e})"),
                format!(
                    "; if nats-server is running there, the TLS handshake may be what fails: {hint}"
                ),
            ),
            (Some(e), _) => (format!(" (last error: {e})"), String::new()),
            (None, _) => (String::new(), String::new()),
        };
        format!(
            "the connection to NATS at {} is {state}{error}; the client reconnects on its \
             own. Check that nats-server is running there, or fix config.url{hint}",
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
            ..Config::default()
        };
        match bad.validate(&|_| None) {
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
        assert!(Config::default().validate(&|_| None).is_ok());
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
    fn credentials_come_from_files_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tok\n").unwrap();
        let env = |name: &str| (name == "NATS_PW").then(|| "pw".to_string());
        let check = |json: &str| config(json).unwrap().validate(&env).map(|c| c.credentials);
        assert_eq!(
            check(r#"{"user": "app", "password_env": "NATS_PW"}"#).unwrap(),
            Credentials::UserPassword("app".into(), Secret::new("pw"))
        );
        let json = format!(r#"{{"token_file": {:?}}}"#, file.display().to_string());
        assert_eq!(
            check(&json).unwrap(),
            Credentials::Token(Secret::new("tok"))
        );
        let fields = |json: &str| match check(json) {
            Err(Error::InvalidArgument(v)) => v.into_iter().map(|v| v.field).collect::<Vec<_>>(),
            other => panic!("want InvalidArgument, got {other:?}"),
        };
        assert_eq!(fields(r#"{"user": "app"}"#), ["config.user"]);
        assert_eq!(
            fields(r#"{"password_env": "NATS_PW"}"#),
            ["config.password_file"]
        );
        assert_eq!(
            fields(r#"{"url": "nats://u:p@h:1", "user": "a", "password_env": "NATS_PW"}"#),
            ["config.url"]
        );
        assert_eq!(
            fields(r#"{"tls": {"ca_file": "/nonexistent/ca.pem"}}"#),
            ["config.tls.ca_file"]
        );
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
