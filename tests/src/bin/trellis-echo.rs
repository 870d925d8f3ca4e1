//! `trellis-echo`: a pattern written straight against the pattern protocol
//! (docs/pattern-protocol.md) with tonic: no `pattern_sdk::Server`, only the
//! SDK's listen-address parser, binder and handshake formatter. It exists for
//! two reasons: to prove that a pattern needs nothing but the protocol (what
//! this file does, a pattern in any language can do), and to prove that the
//! proxy passes HTTP/2 requests and responses through unchanged, by showing
//! a test exactly what arrived and answering with exactly-known bytes. Not
//! shipped.
//!
//! Protocol: binds `TRELLIS_PATTERN_LISTEN` (default `127.0.0.1:0`, or
//! `unix:/path`), writes `TRELLIS|1|tcp|127.0.0.1:PORT|grpc` to stdout, logs
//! to stderr only (JSON lines when `TRELLIS_LOG_FORMAT=json`), serves
//! `Lifecycle` and `grpc.health.v1.Health` (`""` is SERVING after `Start`),
//! and exits 0 soon after answering `Stop`, or on SIGTERM/SIGINT: in-flight
//! calls get the grace period (Stop's, or 2 s), then open subscriptions are
//! cut off.
//!
//! Its `config:` block:
//! - `interfaces: [trellis.data.v1.KeyValue, trellis.data.v1.PubSub]`: the
//!   data services it claims in `InitializeResponse` and serves (default:
//!   KeyValue only; `[]` claims none). A call to an unclaimed service gets
//!   UNIMPLEMENTED; a data call before `Initialize` gets UNAVAILABLE.
//!   Anything else in the block is INVALID_ARGUMENT naming the field.
//!
//! KeyValue, by request key (namespaces are ignored):
//! - `Get headers`: a JSON object mapping each request header name to the
//!   list of its values, exactly as they arrived at the HTTP level (captured
//!   by a tower layer before tonic sees the request, so `te`,
//!   `content-type`, `grpc-timeout`, `user-agent` … are all there), plus the
//!   pseudo-headers `:method`, `:scheme`, `:authority`, `:path` as hyper
//!   parsed them. Values that are not UTF-8 are converted lossily.
//! - `Get fail`: FAILED_PRECONDITION `echo: failing on purpose`, with
//!   `grpc-status-details-bin` = google.rpc.Status carrying only
//!   `ErrorInfo{reason: "ECHO_FAIL", domain: "trellis.echo", metadata: {k: v}}`,
//!   and metadata `x-echo-trailer: t1`, `x-echo-bin-bin: [0, 1, 2, 255]`
//!   (tonic sends an error as a Trailers-Only response: one header block).
//! - `Get ok-trailers`: value `ok`, response header `x-echo-header: h1`, and
//!   `x-echo-trailer: t2` in the trailers next to `grpc-status: 0`.
//! - `Get sleep:<ms>`: sleeps that long, then value `slept`; a call the
//!   caller gave up on first is counted (`Get cancelled`).
//! - `Get big:<n>`: a value of n bytes, byte i being `i % 251` (up to
//!   64 MiB minus a few bytes: messages may be 64 MiB either way).
//! - `Get puts`: how many `Put` calls arrived, as decimal text.
//! - `Get subscriptions`: how many subscriptions are open now, as decimal text.
//! - `Get <anything else>`: the key's bytes.
//! - `Put`: counted, nothing stored. `Delete`: `deleted: true`. `List`: empty.
//!
//! Faults, for the traffic-policy tests (every call to an `<id>` counted,
//! Get or Put alike; `Get attempts:<id>` reads the count):
//! - `flaky:<id>`: the first call fails UNAVAILABLE, later ones succeed;
//! - `down:<id>`: every call fails UNAVAILABLE;
//! - `pushback:<ms>:<id>`: the first call fails UNAVAILABLE with
//!   `grpc-retry-pushback-ms: <ms>`, later ones succeed;
//! - `Put mode` with value `fail` / `ok`: from then on `Get m:<id>`
//!   fails UNAVAILABLE / succeeds (a pattern that starts failing, then
//!   recovers);
//! - `Get cancelled`: how many `sleep:` calls ended because the caller
//!   went away (the stream was reset) before they answered.
//! - `Get sleeping`: how many `sleep:` calls are sleeping now.
//!
//! PubSub (when claimed):
//! - `Publish`: message id `echo-<n>`, n = 1, 2, … over all publishes.
//! - `Subscribe count:<n>`: n messages (id and payload: the index 0..n as
//!   decimal text), then the stream ends OK.
//! - `Subscribe <other topic>`: one message (id and payload `hello`) at once,
//!   then open until the client goes away.
//!
//! Every response (every method, errors included) carries the header
//! `x-echo-pid: <process id>`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use http_body::Frame;
use http_body_util::BodyExt;
use pattern_sdk::{ListenAddr, Listener, format_handshake};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tonic_types::{ErrorDetails, StatusExt};
use tower::util::{MapRequestLayer, MapResponseLayer};
use trellis_proto::data::v1 as data;
use trellis_proto::data::v1::key_value_server::{KeyValue, KeyValueServer};
use trellis_proto::data::v1::pub_sub_server::{PubSub, PubSubServer};
use trellis_proto::pattern::v1 as lifecycle;
use trellis_proto::pattern::v1::lifecycle_server::{Lifecycle, LifecycleServer};
use trellis_proto::{KEY_VALUE_SERVICE, PUB_SUB_SERVICE};

/// Largest message either way, so `big:<n>` can exceed tonic's 4 MiB default.
const MAX_MESSAGE: usize = 64 << 20;
/// Largest `big:<n>`: room for the GetResponse field's tag and length.
const MAX_BIG: usize = MAX_MESSAGE - 16;
/// How long in-flight calls may run after a signal (Stop brings its own).
const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// The request's header block as it arrived, put into the request's
/// extensions by [`capture_headers`] before tonic sees the request.
#[derive(Clone)]
struct RawHeaders {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

/// Trailers a handler wants added after tonic's own (tonic cannot add any to
/// a successful unary response); [`finish_response`] appends them.
#[derive(Clone)]
struct ExtraTrailers(http::HeaderMap);

fn capture_headers(mut req: http::Request<Body>) -> http::Request<Body> {
    let raw = RawHeaders {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
    };
    req.extensions_mut().insert(raw);
    req
}

fn finish_response(mut res: http::Response<Body>) -> http::Response<Body> {
    res.headers_mut()
        .insert("x-echo-pid", http::HeaderValue::from(std::process::id()));
    match res.extensions_mut().remove::<ExtraTrailers>() {
        None => res,
        Some(ExtraTrailers(mut extra)) => res.map(|body| {
            Body::new(body.map_frame(move |frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    trailers.extend(std::mem::take(&mut extra));
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))
        }),
    }
}

/// The request headers as JSON: name → every value, in arrival order.
fn headers_json(raw: &RawHeaders) -> Result<Vec<u8>, Status> {
    let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let uri = &raw.uri;
    let pseudo = [
        (":method", Some(raw.method.as_str())),
        (":scheme", uri.scheme_str()),
        (":authority", uri.authority().map(|a| a.as_str())),
        (":path", uri.path_and_query().map(|p| p.as_str())),
    ];
    for (name, value) in pseudo {
        if let Some(value) = value {
            all.insert(name.into(), vec![value.into()]);
        }
    }
    for (name, value) in &raw.headers {
        all.entry(name.as_str().into())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    serde_json::to_vec(&all).map_err(|e| Status::internal(format!("echo: headers as JSON: {e}")))
}

fn failure() -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        "ECHO_FAIL",
        "trellis.echo",
        HashMap::from([("k".to_string(), "v".to_string())]),
    );
    let mut metadata = MetadataMap::new();
    metadata.insert("x-echo-trailer", MetadataValue::from_static("t1"));
    metadata.insert_bin("x-echo-bin-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
    Status::with_error_details_and_metadata(
        Code::FailedPrecondition,
        "echo: failing on purpose",
        details,
        metadata,
    )
}

fn ok_with_trailers() -> Response<data::GetResponse> {
    let mut res = Response::new(data::GetResponse {
        value: b"ok".to_vec(),
    });
    res.metadata_mut()
        .insert("x-echo-header", MetadataValue::from_static("h1"));
    let mut extra = http::HeaderMap::new();
    extra.insert("x-echo-trailer", http::HeaderValue::from_static("t2"));
    res.extensions_mut().insert(ExtraTrailers(extra));
    res
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Status {
    pattern_sdk::Error::invalid_argument(field, message).into()
}

fn number(field: &str, text: &str) -> Result<u64, Status> {
    text.parse()
        .map_err(|_| invalid(field, format!("{text:?} is not a whole number")))
}

/// The data services named by `config.interfaces` (default: KeyValue only).
fn claimed_interfaces(config: Option<prost_types::Struct>) -> Result<Vec<&'static str>, Status> {
    let config = config.map(trellis_proto::json::from_struct);
    let mut claims = vec![KEY_VALUE_SERVICE];
    for (field, value) in config.into_iter().flatten() {
        if field != "interfaces" {
            return Err(invalid(
                format!("config.{field}"),
                "unknown field; echo knows only `interfaces`",
            ));
        }
        let names = value
            .as_array()
            .ok_or_else(|| invalid("config.interfaces", "must be a list of service names"))?;
        claims.clear();
        for (i, name) in names.iter().enumerate() {
            let service = [KEY_VALUE_SERVICE, PUB_SUB_SERVICE]
                .into_iter()
                .find(|s| name.as_str() == Some(s))
                .ok_or_else(|| {
                    invalid(
                        format!("config.interfaces[{i}]"),
                        format!("{name} is not {KEY_VALUE_SERVICE} or {PUB_SUB_SERVICE}"),
                    )
                })?;
            if !claims.contains(&service) {
                claims.push(service);
            }
        }
    }
    Ok(claims)
}

/// Counts itself among the open subscriptions while alive.
struct Open(Arc<AtomicU64>);

impl Open {
    fn new(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Open(Arc::clone(count))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Messages = Pin<Box<dyn Stream<Item = Result<data::Message, Status>> + Send>>;

/// A subscription's messages, holding its [`Open`] until tonic drops it
/// (when it ended or the client went away).
struct Subscription {
    messages: Messages,
    _open: Open,
}

impl Stream for Subscription {
    type Item = Result<data::Message, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.messages.as_mut().poll_next(cx)
    }
}

fn message(topic: &str, text: String) -> Result<data::Message, Status> {
    Ok(data::Message {
        message_id: text.clone(),
        topic: topic.into(),
        payload: text.into_bytes(),
        ..Default::default()
    })
}

struct Echo {
    /// `None` until Initialize; then the claimed data services.
    claims: Mutex<Option<Vec<&'static str>>>,
    puts: AtomicU64,
    publishes: AtomicU64,
    subscriptions: Arc<AtomicU64>,
    /// Calls seen per fault id.
    attempts: Mutex<HashMap<String, u64>>,
    /// `Put mode fail` sets it: `Get m:*` then fails.
    failing: std::sync::atomic::AtomicBool,
    cancelled: Arc<AtomicU64>,
    /// `sleep:` calls sleeping now.
    sleeping: Arc<AtomicU64>,
    health: HealthReporter,
    /// `Some(grace)` once Stop or a signal asked to exit.
    stopping: watch::Sender<Option<Duration>>,
}

impl Echo {
    /// Counts a call to a fault key and answers what the fault says, or
    /// `None` when the key is not a fault.
    fn fault(&self, key: &str) -> Option<Result<(), Status>> {
        let (kind, rest) = key.split_once(':')?;
        let (pushback, id) = match kind {
            "flaky" | "down" => (None, rest),
            "pushback" => {
                let (ms, id) = rest.split_once(':')?;
                (Some(ms.to_string()), id)
            }
            "m" => {
                self.count(rest);
                return Some(if self.failing.load(Ordering::SeqCst) {
                    Err(Status::unavailable("echo: failing (mode fail)"))
                } else {
                    Ok(())
                });
            }
            _ => return None,
        };
        let n = self.count(id);
        Some(match (kind, n) {
            ("down", _) | (_, 1) => {
                let mut status = Status::unavailable(format!("echo: {kind} {id}, attempt {n}"));
                if let Some(ms) =
                    pushback.and_then(|ms| ms.parse::<tonic::metadata::MetadataValue<_>>().ok())
                {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", ms);
                }
                Err(status)
            }
            _ => Ok(()),
        })
    }

    /// Counts one more call to fault `id`; the count so far.
    fn count(&self, id: &str) -> u64 {
        let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = attempts.entry(id.to_string()).or_default();
        *n += 1;
        *n
    }

    fn serving(&self, service: &str) -> Result<(), Status> {
        match &*self.claims.lock().unwrap_or_else(PoisonError::into_inner) {
            None => Err(Status::unavailable("echo: not initialized yet")),
            Some(claims) if claims.contains(&service) => Ok(()),
            Some(_) => Err(Status::unimplemented(format!(
                "echo: {service} is not in config.interfaces"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Lifecycle for Echo {
    async fn initialize(
        &self,
        req: Request<lifecycle::InitializeRequest>,
    ) -> Result<Response<lifecycle::InitializeResponse>, Status> {
        let req = req.into_inner();
        let claims = claimed_interfaces(req.config)?;
        log(
            "info",
            &format!("initialized as {:?}, serving {claims:?}", req.name),
        );
        *self.claims.lock().unwrap_or_else(PoisonError::into_inner) = Some(claims.clone());
        Ok(Response::new(lifecycle::InitializeResponse {
            name: "echo".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            interfaces: claims.into_iter().map(String::from).collect(),
            // No data of its own to keep consistent (its counters are per
            // process by design), so the proxy may run replicas of it.
            stateful: false,
        }))
    }

    async fn start(
        &self,
        _req: Request<lifecycle::StartRequest>,
    ) -> Result<Response<lifecycle::StartResponse>, Status> {
        if self
            .claims
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return Err(Status::failed_precondition("echo: Start before Initialize"));
        }
        self.health
            .set_service_status("", ServingStatus::Serving)
            .await;
        Ok(Response::new(lifecycle::StartResponse {}))
    }

    async fn stop(
        &self,
        req: Request<lifecycle::StopRequest>,
    ) -> Result<Response<lifecycle::StopResponse>, Status> {
        let grace = req
            .into_inner()
            .grace
            .and_then(|g| Duration::try_from(g).ok())
            .unwrap_or(DEFAULT_GRACE);
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.stopping
            .send_if_modified(|s| s.replace(grace).is_none());
        Ok(Response::new(lifecycle::StopResponse {}))
    }

    /// Optional in the protocol: a pattern without metrics says so, and
    /// the proxy's scrape goes on without it.
    async fn metrics(
        &self,
        _req: Request<lifecycle::MetricsRequest>,
    ) -> Result<Response<lifecycle::MetricsResponse>, Status> {
        Err(Status::unimplemented("echo: no metrics"))
    }
}

#[tonic::async_trait]
impl KeyValue for Echo {
    async fn get(
        &self,
        req: Request<data::GetRequest>,
    ) -> Result<Response<data::GetResponse>, Status> {
        self.serving(KEY_VALUE_SERVICE)?;
        let key = req.get_ref().key.as_str();
        if let Some(answer) = self.fault(key) {
            answer?;
            return Ok(Response::new(data::GetResponse {
                value: b"recovered".to_vec(),
            }));
        }
        let value = if let Some(ms) = key.strip_prefix("sleep:") {
            let ms = number("key", ms)?;
            // Counts the call as sleeping while it sleeps, and as
            // cancelled unless it gets to answer.
            struct Unfinished {
                cancelled: Arc<AtomicU64>,
                sleeping: Arc<AtomicU64>,
                done: bool,
            }
            impl Drop for Unfinished {
                fn drop(&mut self) {
                    self.sleeping.fetch_sub(1, Ordering::SeqCst);
                    if !self.done {
                        self.cancelled.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            let mut guard = Unfinished {
                cancelled: self.cancelled.clone(),
                sleeping: self.sleeping.clone(),
                done: false,
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            guard.done = true;
            b"slept".to_vec()
        } else if let Some(n) = key.strip_prefix("big:") {
            let n = usize::try_from(number("key", n)?).unwrap_or(usize::MAX);
            if n > MAX_BIG {
                return Err(invalid("key", format!("big:<n> allows at most {MAX_BIG}")));
            }
            (0..n).map(|i| (i % 251) as u8).collect()
        } else {
            match key {
                "headers" => {
                    let raw = req.extensions().get::<RawHeaders>().ok_or_else(|| {
                        Status::internal("echo: the header-capturing layer did not run")
                    })?;
                    headers_json(raw)?
                }
                "fail" => return Err(failure()),
                "ok-trailers" => return Ok(ok_with_trailers()),
                "puts" => self.puts.load(Ordering::SeqCst).to_string().into_bytes(),
                "cancelled" => self
                    .cancelled
                    .load(Ordering::SeqCst)
                    .to_string()
                    .into_bytes(),
                "sleeping" => self
                    .sleeping
                    .load(Ordering::SeqCst)
                    .to_string()
                    .into_bytes(),
                k if k.starts_with("attempts:") => {
                    let id = &k["attempts:".len()..];
                    let attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
                    attempts
                        .get(id)
                        .copied()
                        .unwrap_or(0)
                        .to_string()
                        .into_bytes()
                }
                "subscriptions" => self
                    .subscriptions
                    .load(Ordering::SeqCst)
                    .to_string()
                    .into_bytes(),
                other => other.as_bytes().to_vec(),
            }
        };
        Ok(Response::new(data::GetResponse { value }))
    }

    async fn put(
        &self,
        req: Request<data::PutRequest>,
    ) -> Result<Response<data::PutResponse>, Status> {
        self.serving(KEY_VALUE_SERVICE)?;
        self.puts.fetch_add(1, Ordering::SeqCst);
        let req = req.into_inner();
        if req.key == "mode" {
            self.failing.store(req.value == b"fail", Ordering::SeqCst);
        } else if let Some(answer) = self.fault(&req.key) {
            answer?;
        }
        Ok(Response::new(data::PutResponse {}))
    }

    async fn delete(
        &self,
        _req: Request<data::DeleteRequest>,
    ) -> Result<Response<data::DeleteResponse>, Status> {
        self.serving(KEY_VALUE_SERVICE)?;
        Ok(Response::new(data::DeleteResponse { deleted: true }))
    }

    async fn list(
        &self,
        _req: Request<data::ListRequest>,
    ) -> Result<Response<data::ListResponse>, Status> {
        self.serving(KEY_VALUE_SERVICE)?;
        Ok(Response::new(data::ListResponse::default()))
    }
}

#[tonic::async_trait]
impl PubSub for Echo {
    type SubscribeStream = Subscription;

    async fn publish(
        &self,
        _req: Request<data::PublishRequest>,
    ) -> Result<Response<data::PublishResponse>, Status> {
        self.serving(PUB_SUB_SERVICE)?;
        let n = self.publishes.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(data::PublishResponse {
            message_id: format!("echo-{n}"),
        }))
    }

    async fn subscribe(
        &self,
        req: Request<data::SubscribeRequest>,
    ) -> Result<Response<Subscription>, Status> {
        self.serving(PUB_SUB_SERVICE)?;
        let topic = req.into_inner().topic;
        let messages: Messages = match topic.strip_prefix("count:") {
            Some(n) => {
                let n = number("topic", n)?;
                Box::pin(stream::iter(0..n).map(move |i| message(&topic, i.to_string())))
            }
            None => Box::pin(
                stream::once(async move { message(&topic, "hello".into()) })
                    .chain(stream::pending()),
            ),
        };
        Ok(Response::new(Subscription {
            messages,
            _open: Open::new(&self.subscriptions),
        }))
    }
}

/// One log line on stderr, as JSON when the proxy asked for it.
fn log(level: &str, message: &str) {
    if std::env::var("TRELLIS_LOG_FORMAT").as_deref() == Ok("json") {
        eprintln!(
            "{}",
            serde_json::json!({ "level": level, "fields": { "message": message } })
        );
    } else {
        eprintln!("echo {level}: {message}");
    }
}

/// Resolves with the grace period once Stop or a signal asked to exit.
async fn stop_requested(mut stopping: watch::Receiver<Option<Duration>>) -> Duration {
    match stopping.wait_for(Option::is_some).await {
        Ok(grace) => grace.unwrap_or(DEFAULT_GRACE),
        Err(_) => DEFAULT_GRACE,
    }
}

/// Runs `server` until asked to stop, then gives in-flight calls the grace
/// period (an endless subscription would otherwise keep it forever).
async fn serve(
    server: impl Future<Output = Result<(), tonic::transport::Error>>,
    stopping: watch::Receiver<Option<Duration>>,
) -> Result<(), String> {
    tokio::pin!(server);
    let grace = tokio::select! {
        done = &mut server => return done.map_err(|e| format!("serving: {e}")),
        grace = stop_requested(stopping) => grace,
    };
    match tokio::time::timeout(grace, server).await {
        Ok(done) => done.map_err(|e| format!("serving: {e}")),
        Err(_) => {
            log("warn", "calls still open after the grace period; exiting");
            Ok(())
        }
    }
}

async fn run() -> Result<(), String> {
    // Before the handshake, so a SIGTERM right after it is handled.
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let listen: ListenAddr = match std::env::var("TRELLIS_PATTERN_LISTEN") {
        Ok(addr) => addr
            .parse()
            .map_err(|e| format!("TRELLIS_PATTERN_LISTEN: {e}"))?,
        Err(_) => ListenAddr::default(),
    };
    let listener = Listener::bind(&listen).await.map_err(|e| e.to_string())?;
    let endpoint = listener
        .endpoint()
        .map_err(|e| format!("bound address: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", format_handshake(&endpoint))
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("writing the handshake: {e}"))?;
    drop(stdout);
    log("info", &format!("listening on {endpoint}"));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let (stopping, stop_rx) = watch::channel(None);
    let echo = Arc::new(Echo {
        claims: Mutex::new(None),
        puts: AtomicU64::new(0),
        publishes: AtomicU64::new(0),
        subscriptions: Arc::new(AtomicU64::new(0)),
        attempts: Mutex::new(HashMap::new()),
        failing: std::sync::atomic::AtomicBool::new(false),
        cancelled: Arc::new(AtomicU64::new(0)),
        sleeping: Arc::new(AtomicU64::new(0)),
        health,
        stopping,
    });
    let on_signal = {
        let echo = Arc::clone(&echo);
        async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            log("info", &format!("{name}: exiting"));
            echo.stopping
                .send_if_modified(|s| s.replace(DEFAULT_GRACE).is_none());
        }
    };
    let signals = tokio::spawn(on_signal);

    let router = tonic::transport::Server::builder()
        .layer(MapRequestLayer::new(capture_headers))
        .layer(MapResponseLayer::new(finish_response))
        .add_service(LifecycleServer::from_arc(Arc::clone(&echo)))
        .add_service(health_service)
        .add_service(
            KeyValueServer::from_arc(Arc::clone(&echo))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            PubSubServer::from_arc(Arc::clone(&echo))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    let shutdown = {
        let stop_rx = stop_rx.clone();
        async move {
            stop_requested(stop_rx).await;
        }
    };
    let result = match listener {
        Listener::Tcp(l) => {
            let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
            serve(
                router.serve_with_incoming_shutdown(incoming, shutdown),
                stop_rx,
            )
            .await
        }
        Listener::Unix(l, _socket_file) => {
            let incoming = UnixListenerStream::new(l);
            serve(
                router.serve_with_incoming_shutdown(incoming, shutdown),
                stop_rx,
            )
            .await
        }
    };
    signals.abort();
    result
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => {
            log("info", "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log("error", &e);
            ExitCode::FAILURE
        }
    }
}
