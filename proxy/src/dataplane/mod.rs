//! The data plane: every data call — `trellis.data.v1.KeyValue` and
//! `trellis.data.v1.PubSub`, unary and streaming, from the gRPC listener
//! and from the HTTP gateway alike — goes through one forwarding stack.
//! Calls are forwarded at the HTTP/2 level: the request's bytes go to the
//! pattern as they came, and the pattern's response headers, messages and
//! trailers come back as they left it. No message is decoded; the
//! namespace is read by a scan of field 1 of the one request message.
//!
//! ```text
//!  HTTP/2 request ──▶ DataPlane::handle   (the edge)
//!    read the request message (one, ≤ 4 MiB, within the deadline), look up
//!    the method, scan the namespace, prepare the metadata, fix the deadline
//!    ──▶ Authorize  with `access:`: the caller's identity and role on the
//!                   namespace (UNAUTHENTICATED, PERMISSION_DENIED)
//!    ──▶ Route      namespace → its pattern's processes (a `Pool`)
//!                   (NOT_FOUND; UNAVAILABLE, UNIMPLEMENTED when none serves it)
//!    ──▶ Balance    per attempt: the replica (least request, two random
//!                   choices; outliers ejected)
//!    ──▶ Deadline   grpc-timeout for the pattern; a unary call is bounded
//!                   whole, a stream only until it opens
//!    ──▶ Drain      open streams end UNAVAILABLE when the proxy shuts down
//!    ──▶ Forward    one HTTP/2 stream on the pattern's connection
//!  ◀── the pattern's response, streamed; an ApiError from any layer
//!      becomes a trailers-only gRPC response at the edge
//! ```
//!
//! Every layer is a `tower::Service<Call>` answering
//! `http::Response<CallBody>` or an [`ApiError`]: a new capability
//! (metrics, retries, limits) is one more layer in [`stack`], and
//! forwarding does not change. Where it goes: what must see every call,
//! refused ones included (metrics, logs), wraps the edge's stack from
//! outside `Route`; what acts per attempt on a known pattern (retries,
//! concurrency limits, circuit breaking) sits between `Route` and
//! `Deadline`, so each attempt gets the time that is left.

mod authorize;
mod balance;
mod body;
mod breaker;
mod deadline;
mod drain;
mod errors;
mod forward;
mod limits;
mod methods;
mod observe;
mod outcome;
mod retry;
mod route;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::CancellationToken;
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

pub use balance::Load;
pub use body::CallBody;
pub use breaker::{CircuitView, Circuits};
pub use methods::{DATA_SERVICES, DataMethod, Methods, is_data_path};
pub use observe::Telemetry;
pub use route::Router;
pub use wire::MAX_MESSAGE_BYTES;

use crate::error::ApiError;
use crate::policy::Resolved;
use crate::upstream::Upstream;

/// The client's address, put in a request's extensions by the door it
/// came through.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// One data call, as it travels down the stack.
pub struct Call {
    pub method: Arc<DataMethod>,
    pub path: PathAndQuery,
    pub namespace: Arc<str>,
    /// What goes to the pattern: the client's metadata without hop-by-hop
    /// and `grpc-*` headers, with a request id (see `metadata`).
    pub headers: HeaderMap,
    /// The one request message with its 5-byte prefix, as received.
    pub message: Bytes,
    /// When the request arrived.
    pub received: Instant,
    /// When the call must be over: `min(client grpc-timeout,
    /// request_timeout)` from when it arrived.
    pub deadline: Instant,
    /// The deadline's length, for messages.
    pub budget: Duration,
    /// The client chose a deadline shorter than the proxy's bound: running
    /// out of it says nothing about the pattern (the circuit breaker does
    /// not count it).
    pub client_deadline: bool,
    /// The namespace's traffic policy.
    pub policy: Arc<Resolved>,
    /// The client's address, when the front door knows it.
    pub peer: Option<std::net::SocketAddr>,
    /// The name in the connection's client certificate (mutual TLS).
    pub cert: Option<Arc<str>>,
    /// Who the caller is, set by `Authorize` when `access:` is configured.
    pub identity: Option<Arc<str>>,
    /// The namespace's processes (a pattern's replicas), set by `Route`.
    pub pool: Option<Arc<balance::Pool>>,
    /// The members earlier attempts of this call went to (bit i: member
    /// i), shared by its attempts; set by `Retry` for a call it may repeat.
    pub tried: Option<Arc<std::sync::atomic::AtomicU32>>,
    /// The process this attempt goes to, set by `Balance`.
    pub upstream: Option<Upstream>,
    /// The call's server span, set by `Observe` while traces are on.
    pub trace: Option<opentelemetry::Context>,
}

impl Call {
    /// A copy of the call for another attempt (`Retry`).
    fn again(&self) -> Call {
        Call {
            method: self.method.clone(),
            path: self.path.clone(),
            namespace: self.namespace.clone(),
            headers: self.headers.clone(),
            message: self.message.clone(),
            received: self.received,
            deadline: self.deadline,
            budget: self.budget,
            client_deadline: self.client_deadline,
            policy: self.policy.clone(),
            peer: self.peer,
            cert: self.cert.clone(),
            identity: self.identity.clone(),
            pool: self.pool.clone(),
            tried: self.tried.clone(),
            upstream: self.upstream.clone(),
            trace: self.trace.clone(),
        }
    }
}

/// A trailers-only gRPC response for an error a door refuses a call with
/// (the admin door's access check).
pub fn refusal(e: ApiError) -> Response<CallBody> {
    errors::response(e)
}

/// The stack below the edge.
pub type Stack = observe::Observe<
    limits::Shed<
        authorize::Authorize<
            route::Route<
                limits::RateLimit<
                    limits::Concurrency<
                        breaker::Breaker<
                            retry::Retry<
                                balance::Balance<
                                    deadline::Deadline<
                                        drain::Drain<observe::Hop<forward::Forward>>,
                                    >,
                                >,
                            >,
                        >,
                    >,
                >,
            >,
        >,
    >,
>;

/// Builds the stack, innermost layer first; each layer's place, and why:
///
/// 1. `Observe` — outermost: every call, refused ones included, is
///    measured and logged.
/// 2. `Shed` — the proxy's own overload comes before any per-namespace
///    work: refusing early is the point.
/// 3. `Authorize` — with `access:`, who the caller is and whether it holds
///    the method's role on the namespace (UNAUTHENTICATED,
///    PERMISSION_DENIED); before `Route`, so a caller without the role
///    learns nothing about the namespace, and before the limits, which
///    key per-caller buckets on the identity it finds.
/// 4. `Route` — NOT_FOUND / UNAVAILABLE / UNIMPLEMENTED; the layers below
///    act on a known, serving pattern.
/// 5. `RateLimit` — before `Concurrency`, so a caller over its rate never
///    holds a slot.
/// 6. `Concurrency` — slots per namespace; a call refused by the breaker
///    below gives its slot back at once.
/// 7. `Breaker` — sees each call's final outcome (after retries): an open
///    circuit fails calls before they wait on retries or the pattern.
/// 8. `Retry` — each attempt runs the layers below afresh, all inside the
///    call's one deadline.
/// 9. `Balance` — the replica for this attempt (another than the earlier
///    attempts' when one serves), counted in flight until the attempt ends.
/// 10. `Deadline`, `Drain`, `Hop`, `Forward` — one attempt.
pub fn stack(
    router: Router,
    closing: CancellationToken,
    telemetry: Arc<Telemetry>,
    policies: &Policies,
    circuits: Arc<Circuits>,
    max_in_flight: u32,
    access: crate::access::Access,
) -> Stack {
    let t = || telemetry.clone();
    let attempt = forward::Forward;
    // Just above forwarding: the hop to the pattern, timed from the send.
    let attempt = observe::HopLayer::new(t()).layer(attempt);
    // Only a stream that reached the pattern can be drained.
    let attempt = drain::DrainLayer::new(closing).layer(attempt);
    // Inside Route, so the deadline's messages can name the pattern, and
    // outside Drain, so a stream is bounded until it opens.
    let attempt = deadline::DeadlineLayer.layer(attempt);
    // Per attempt, so a retry goes to another replica; outside Deadline,
    // so a replica's count covers its whole attempt.
    let attempt = balance::BalanceLayer::new(router.clone()).layer(attempt);
    let call = retry::RetryLayer::new(policies, t()).layer(attempt);
    let call = breaker::BreakerLayer::new(circuits, t()).layer(call);
    let call = limits::ConcurrencyLayer::new(policies, t()).layer(call);
    let call = limits::RateLimitLayer::new(policies, t()).layer(call);
    let routed = route::RouteLayer::new(router).layer(call);
    let authorized = authorize::AuthorizeLayer::new(access).layer(routed);
    let shed = limits::ShedLayer::new(t(), max_in_flight).layer(authorized);
    // Outermost: every call, refused ones included.
    observe::ObserveLayer::new(telemetry).layer(shed)
}

/// The edge of the data plane: HTTP/2 requests in, gRPC responses out.
///
/// What a reload can change — routes, policies, `request_timeout`,
/// `max_in_flight` — is one [`Generation`], swapped whole (`arc-swap`):
/// each call reads the current generation once, so it sees the old
/// configuration or the new one, never a mix, and calls in flight finish
/// on the generation they started on.
#[derive(Clone)]
pub struct DataPlane {
    methods: Arc<Methods>,
    current: Arc<ArcSwap<Generation>>,
    /// What every generation is built with.
    closing: CancellationToken,
    /// The access rules (shared with the admin door; a reload replaces
    /// them in place, whatever the generation).
    access: crate::access::Access,
}

/// One configuration of the data plane, with the state its layers keep
/// (rate-limit buckets, concurrency slots, circuits).
struct Generation {
    stack: Stack,
    router: Router,
    request_timeout: Duration,
    policies: Arc<Policies>,
    telemetry: Arc<Telemetry>,
    circuits: Arc<Circuits>,
    /// What the generation was built from, to tell whether a new
    /// configuration needs a new one.
    settings: Settings,
}

/// The parts of a configuration a generation is built from, besides the
/// routes.
#[derive(Clone, PartialEq)]
struct Settings {
    policies: std::collections::BTreeMap<String, crate::policy::Policy>,
    namespaces: Vec<crate::config::NamespaceConfig>,
    request_timeout: Duration,
    max_in_flight: u32,
}

impl Settings {
    fn of(config: &crate::config::Config) -> Self {
        Settings {
            policies: config.policies.clone(),
            namespaces: config.namespaces.clone(),
            request_timeout: config.request_timeout,
            max_in_flight: config.max_in_flight,
        }
    }
}

impl Generation {
    fn new(
        router: Router,
        closing: CancellationToken,
        telemetry: Arc<Telemetry>,
        policies: Policies,
        settings: Settings,
        access: crate::access::Access,
    ) -> Self {
        let circuits = Arc::new(Circuits::new(&policies, &telemetry));
        let stack = stack(
            router.clone(),
            closing,
            telemetry.clone(),
            &policies,
            circuits.clone(),
            settings.max_in_flight,
            access,
        );
        Generation {
            stack,
            router,
            request_timeout: settings.request_timeout,
            policies: Arc::new(policies),
            telemetry,
            circuits,
            settings,
        }
    }
}

/// Each namespace's traffic policy.
pub struct Policies {
    by_namespace: HashMap<String, Arc<Resolved>>,
    /// For namespaces nobody configured (the call is refused by `Route`).
    default: Arc<Resolved>,
}

impl Policies {
    /// From the config's `policies:` and each namespace's `policy:`.
    pub fn new(config: &crate::config::Config) -> Self {
        Policies {
            by_namespace: config
                .namespaces
                .iter()
                .map(|n| {
                    (
                        n.name.clone(),
                        crate::policy::resolve(&config.policies, n.policy.as_deref()),
                    )
                })
                .collect(),
            default: crate::policy::resolve(&config.policies, None),
        }
    }

    /// The built-in defaults everywhere (for tests).
    pub fn defaults() -> Self {
        Policies {
            by_namespace: HashMap::new(),
            default: crate::policy::resolve(&Default::default(), None),
        }
    }

    /// Every configured namespace with its policy.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Arc<Resolved>)> {
        self.by_namespace.iter().map(|(ns, p)| (ns.as_str(), p))
    }

    pub fn get(&self, namespace: &str) -> Arc<Resolved> {
        self.by_namespace
            .get(namespace)
            .unwrap_or(&self.default)
            .clone()
    }
}

impl DataPlane {
    pub fn new(
        methods: Methods,
        router: Router,
        closing: CancellationToken,
        telemetry: Arc<Telemetry>,
        policies: Policies,
        request_timeout: Duration,
        max_in_flight: u32,
    ) -> Self {
        let settings = Settings {
            policies: Default::default(),
            namespaces: Vec::new(),
            request_timeout,
            max_in_flight,
        };
        let access = crate::access::Access::off();
        let generation = Generation::new(
            router,
            closing.clone(),
            telemetry,
            policies,
            settings,
            access.clone(),
        );
        DataPlane::serving(methods, generation, closing, access)
    }

    /// From the proxy's configuration, routing to `patterns`, checking
    /// calls against `access`.
    pub fn from_config(
        methods: Methods,
        config: &crate::config::Config,
        patterns: &[crate::supervisor::PatternHandle],
        closing: CancellationToken,
        telemetry: Arc<Telemetry>,
        access: crate::access::Access,
    ) -> Self {
        let generation = Generation::new(
            Router::configured(patterns, route::outlier_settings(config)),
            closing.clone(),
            telemetry,
            Policies::new(config),
            Settings::of(config),
            access.clone(),
        );
        DataPlane::serving(methods, generation, closing, access)
    }

    fn serving(
        methods: Methods,
        generation: Generation,
        closing: CancellationToken,
        access: crate::access::Access,
    ) -> Self {
        DataPlane {
            methods: Arc::new(methods),
            current: Arc::new(ArcSwap::from_pointee(generation)),
            closing,
            access,
        }
    }

    /// The access rules data calls are checked against.
    pub fn access(&self) -> &crate::access::Access {
        &self.access
    }

    /// Routes every namespace to its pattern in `patterns` from the next
    /// call on, keeping the policies' state (a blue/green replacement).
    pub fn reroute(&self, patterns: &[crate::supervisor::PatternHandle]) {
        self.current.load().router.update(patterns);
    }

    /// Applies a new configuration for new calls: only the routes when
    /// namespaces, policies and bounds are unchanged (limits and circuits
    /// keep their state); otherwise a new generation, whose limiters and
    /// circuits start afresh. `telemetry` is the old one with the new
    /// namespace → pattern labels.
    pub fn reconfigure(
        &self,
        config: &crate::config::Config,
        patterns: &[crate::supervisor::PatternHandle],
        telemetry: &Arc<Telemetry>,
    ) {
        let settings = Settings::of(config);
        let outlier = route::outlier_settings(config);
        // The current generation's routes change either way: its calls
        // still in flight pick their next attempt's process from the new
        // ones (`Balance`), never a process being retired.
        self.current
            .load()
            .router
            .reconfigure(patterns, outlier.clone());
        if self.current.load().settings == settings {
            return;
        }
        let generation = Generation::new(
            Router::configured(patterns, outlier),
            self.closing.clone(),
            telemetry.clone(),
            Policies::new(config),
            settings,
            self.access.clone(),
        );
        self.current.store(Arc::new(generation));
    }

    /// The namespaces' circuit breakers (for the admin API).
    pub fn circuits(&self) -> Arc<Circuits> {
        self.current.load().circuits.clone()
    }

    /// The telemetry calls are recorded with now.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.current.load().telemetry.clone()
    }

    /// Answers one call; never fails: errors are gRPC statuses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<CallBody>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let received = Instant::now();
        if self.closing.is_cancelled() {
            // Sent before the client read our GOAWAY: nothing was done.
            return errors::response(errors::closing());
        }
        let generation = self.current.load_full();
        let path = req.uri().path().to_string();
        let request_id = req.headers().get(crate::metadata::REQUEST_ID).cloned();
        match self.call(&generation, req, received).await {
            Ok(call) => match generation.stack.clone().oneshot(call).await {
                Ok(response) => response,
                Err(e) => errors::response(e),
            },
            Err(e) => {
                generation
                    .telemetry
                    .refused(&path, &e, received, request_id.as_ref());
                errors::response(e)
            }
        }
    }

    /// The request as a [`Call`], or why it cannot be one.
    async fn call<B>(
        &self,
        generation: &Generation,
        req: Request<B>,
        received: Instant,
    ) -> Result<Call, ApiError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (mut parts, body) = req.into_parts();
        let method = self
            .methods
            .get(parts.uri.path())
            .ok_or_else(|| errors::unknown_method(parts.uri.path(), &self.methods))?;
        let client_timeout = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| wire::parse_grpc_timeout(v.as_bytes()));
        // Reading the message is bounded before its namespace (and so its
        // policy) is known.
        let request_timeout = generation.request_timeout;
        let read_budget = client_timeout.map_or(request_timeout, |t| t.min(request_timeout));
        let read_deadline = received + read_budget;
        let message = {
            let mut read = std::pin::pin!(read_message(body));
            // Most requests are already here in full: no timer for them.
            match futures::poll!(read.as_mut()) {
                std::task::Poll::Ready(r) => r?,
                std::task::Poll::Pending => tokio::time::timeout_at(read_deadline, read)
                    .await
                    .map_err(|_| errors::request_too_slow(read_budget))??,
            }
        };
        let namespace: Arc<str> = wire::namespace(&message[wire::PREFIX_LEN..])
            .map_err(errors::malformed_request)?
            .into();
        // The namespace's policy may bound the call differently.
        let policy = generation.policies.get(&namespace);
        let bound = policy.timeout(&method.name).unwrap_or(request_timeout);
        let budget = client_timeout.map_or(bound, |t| t.min(bound));
        let client_deadline = client_timeout.is_some_and(|t| t < bound);
        let deadline = received + budget;
        crate::metadata::prepare_for_pattern(&mut parts.headers);
        if method.writes() {
            idempotency_metadata(
                &mut parts.headers,
                parts.uri.path(),
                &message[wire::PREFIX_LEN..],
                &policy,
            )?;
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Call {
            method,
            path,
            namespace,
            headers: parts.headers,
            message,
            received,
            deadline,
            budget,
            client_deadline,
            policy,
            peer: parts.extensions.get::<Peer>().map(|p| p.0),
            cert: parts
                .extensions
                .get::<crate::access::CertIdentity>()
                .map(|c| c.0.clone()),
            identity: None,
            pool: None,
            tried: None,
            upstream: None,
            trace: None,
        })
    }
}

/// For a write with an `idempotency-key`: checks the key and adds what the
/// pattern needs to record it (trellis_proto::idempotency): the request's
/// fingerprint and the namespace's retention. The client's own
/// `trellis-idempotency-*` headers are gone already (`metadata`).
fn idempotency_metadata(
    headers: &mut HeaderMap,
    path: &str,
    message: &[u8],
    policy: &Resolved,
) -> Result<(), ApiError> {
    use trellis_proto::idempotency as idem;
    let Some(key) = headers.get(idem::KEY) else {
        return Ok(());
    };
    let key = key
        .to_str()
        .map_err(|_| errors::bad_idempotency_key("must be printable ASCII (0x20 to 0x7E)"))?;
    idem::check_key(key).map_err(|rule| errors::bad_idempotency_key(&rule))?;
    let fingerprint = idem::fingerprint(path, message);
    let retention = policy.policy.idempotency.retention.as_millis().to_string();
    for (name, value) in [
        (idem::FINGERPRINT, fingerprint),
        (idem::RETENTION_MS, retention),
    ] {
        if let Ok(mut v) = http::HeaderValue::from_str(&value) {
            v.set_sensitive(true);
            headers.insert(name, v);
        }
    }
    Ok(())
}

/// Reads the one request message of a call: prefix checked before the rest
/// is read (an oversized message is refused without reading it), exactly
/// one message, uncompressed.
async fn read_message<B>(mut body: B) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut have = Received::default();
    let mut need: Option<usize> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| errors::request_unreadable(&e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // request trailers carry nothing the pattern needs
        };
        have.push(data);
        if need.is_none()
            && let Some((compressed, len)) = wire::prefix(have.bytes())
        {
            if compressed {
                return Err(errors::compressed_request());
            }
            if len > MAX_MESSAGE_BYTES {
                return Err(errors::request_too_large(len));
            }
            need = Some(wire::PREFIX_LEN + len);
        }
        if need.is_some_and(|n| have.bytes().len() > n) {
            return Err(errors::more_than_one_message());
        }
    }
    let message = have.into_bytes();
    match need {
        Some(n) if message.len() == n => Ok(message),
        None if message.is_empty() => Err(errors::no_message()),
        _ => Err(errors::truncated_message()),
    }
}

/// The request body so far: usually one chunk, kept as it came.
#[derive(Default)]
enum Received {
    #[default]
    Nothing,
    One(Bytes),
    Many(BytesMut),
}

impl Received {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        *self = match std::mem::take(self) {
            Received::Nothing => Received::One(data),
            Received::One(first) => {
                let mut buf = BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                Received::Many(buf)
            }
            Received::Many(mut buf) => {
                buf.extend_from_slice(&data);
                Received::Many(buf)
            }
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Received::Nothing => &[],
            Received::One(b) => b,
            Received::Many(b) => b,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Received::Nothing => Bytes::new(),
            Received::One(b) => b,
            Received::Many(b) => b.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend((msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    async fn read(chunks: Vec<Vec<u8>>) -> Result<Bytes, ApiError> {
        let frames =
            futures::stream::iter(chunks.into_iter().map(|c| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(c)))
            }));
        read_message(StreamBody::new(frames)).await
    }

    #[tokio::test]
    async fn one_message_in_any_number_of_chunks() {
        let whole = framed(b"\x0a\x01a");
        assert_eq!(read(vec![whole.clone()]).await.unwrap(), whole);
        let chunks = whole.chunks(2).map(<[u8]>::to_vec).collect();
        assert_eq!(read(chunks).await.unwrap(), whole);
        assert_eq!(
            read_message(Full::new(Bytes::from(framed(b""))))
                .await
                .unwrap(),
            framed(b"")
        );
    }

    #[tokio::test]
    async fn bad_bodies_are_refused_with_their_reason() {
        let reason = |r: Result<Bytes, ApiError>| r.unwrap_err().reason;
        assert_eq!(reason(read(vec![]).await), "MISSING_MESSAGE");
        let mut two = framed(b"a");
        two.extend(framed(b"b"));
        assert_eq!(reason(read(vec![two]).await), "MORE_THAN_ONE_MESSAGE");
        assert_eq!(
            reason(read(vec![vec![0, 0, 0, 0, 9, 1]]).await),
            "TRUNCATED_MESSAGE"
        );
        assert_eq!(reason(read(vec![vec![0, 0]]).await), "TRUNCATED_MESSAGE");
        assert_eq!(
            reason(read(vec![vec![1, 0, 0, 0, 0]]).await),
            "COMPRESSED_MESSAGE"
        );
        let mut big = vec![0];
        big.extend(((MAX_MESSAGE_BYTES + 1) as u32).to_be_bytes());
        let err = read(vec![big]).await.unwrap_err();
        assert_eq!(err.code, tonic::Code::ResourceExhausted);
        assert!(err.message.contains("4194304"), "{}", err.message);
    }
}
