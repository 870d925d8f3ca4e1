//! The leak-and-soak workload, shared by `tests/tests/leaks.rs` (a bounded
//! count on the debug build) and `tests/benches/soak.rs` (a million calls
//! on the release build): a proxy with one `trellis-echo` serving namespace
//! [`NAMESPACE`] under a concurrency limit and a per-caller rate limit, a
//! mixed workload ([`Workload`]) that ends calls every way a call can end,
//! and a [`Probe`] that reads the proxy's resident memory, open file
//! descriptors, OS threads and live tokio tasks
//! (`trellis_runtime_alive_tasks` on `GET /metrics`).
//!
//! The mix, cycled by call slot ([`MIX`]), [`IN_FLIGHT`] calls at a time over
//! [`CHANNELS`] HTTP/2 connections:
//!
//! - `Get` of a plain key and `Put`: OK;
//! - `Get fail`: FAILED_PRECONDITION from the pattern, with details;
//! - `Get sleep:50` with a 10 ms deadline: DEADLINE_EXCEEDED from the proxy,
//!   which resets the stream to the pattern;
//! - `Subscribe` dropped after its first message: the client resets the
//!   stream, the proxy must reset the pattern's;
//! - `Get` in a namespace nobody serves: NOT_FOUND, refused at `Route`;
//! - a burst of [`BURST`] concurrent `Get sleep:5`, above the concurrency
//!   limit of [`CONCURRENCY_LIMIT`]: some RESOURCE_EXHAUSTED
//!   (CONCURRENCY_LIMIT). With [`IN_FLIGHT`] above the limit, calls of
//!   every kind are refused too, most of them in a release build (a
//!   refusal is fast, so the workers that get one come back at once).
//!
//! [`POLICY`] leaves the default circuit breaker on, and it counts
//! DEADLINE_EXCEEDED as a failure: a run of five deadline calls ending in a
//! row (they hold their slots longest, so they end together) opens the
//! circuit, and calls to the namespace then end UNAVAILABLE (CIRCUIT_OPEN)
//! for a while: one more way for a call to end.
//!
//! Every call carries `x-client-id` (the rate limit's caller key), a new one
//! every [`CALLS_PER_CALLER`] slots, so per-caller state that is never
//! forgotten grows with the run; and every [`Workload::run`] opens its
//! connections afresh and closes them at the end, so per-connection state
//! that outlives its connection does too.
//!
//! The client is tonic's generated stubs over a bare hyper HTTP/2
//! connection ([`H2Channel`]), not tonic's `Channel`: that one enforces
//! `grpc-timeout` on the client side as well, and its timer (started before
//! the request leaves) would cancel the deadline calls before the proxy
//! answers DEADLINE_EXCEEDED.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_types::StatusExt;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{GetRequest, PutRequest, SubscribeRequest};

use crate::{Proxy, eventually};

/// The namespace the echo pattern serves.
pub const NAMESPACE: &str = "e";
/// A namespace nobody serves.
pub const UNKNOWN_NAMESPACE: &str = "nobody-serves-this";
/// The echo pattern's config: KeyValue and PubSub, for the streams.
pub const ECHO_CONFIG: &str = "interfaces: [trellis.data.v1.KeyValue, trellis.data.v1.PubSub]";
/// The namespace's concurrency limit, as in [`POLICY`].
pub const CONCURRENCY_LIMIT: usize = 8;
/// Top-level config: every namespace gets this policy.
pub const POLICY: &str = "policies:
  default:
    concurrency: { max_in_flight: 8 }
    rate_limit: { per_second: 100000, per_caller: true }";
/// Calls in flight at once (workers).
pub const IN_FLIGHT: usize = 32;
/// HTTP/2 connections the workers share, opened per [`Workload::run`].
pub const CHANNELS: usize = 4;
/// Calls in one burst.
pub const BURST: usize = 12;
/// Call slots per `x-client-id`.
pub const CALLS_PER_CALLER: u64 = 16;
/// The deadline the deadline calls carry, and how long they ask to sleep.
pub const DEADLINE: Duration = Duration::from_millis(10);
const DEADLINE_SLEEP_MS: u64 = 50;
/// How long a burst call asks to sleep (so the burst overlaps).
const BURST_SLEEP_MS: u64 = 5;
/// A call still unanswered after this is counted as `CLIENT_TIMEOUT` (a
/// hang: something is wrong) instead of stalling the run.
pub const CALL_GUARD: Duration = Duration::from_secs(30);
/// The name of the task gauge on `/metrics`.
pub const TASKS_METRIC: &str = "trellis_runtime_alive_tasks";

/// Starts the proxy the workload expects (logging at `warn`: a call log
/// line per call would dominate a million-call run).
pub async fn start_proxy() -> Proxy {
    Proxy::builder()
        .log_level("warn")
        .top(POLICY)
        .echo("echo", &[NAMESPACE], ECHO_CONFIG)
        .start()
        .await
}

// --- the workload ------------------------------------------------------------

/// What a call slot does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Get,
    Put,
    Fail,
    Deadline,
    Stream,
    Unknown,
    Burst,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Get,
        Kind::Put,
        Kind::Fail,
        Kind::Deadline,
        Kind::Stream,
        Kind::Unknown,
        Kind::Burst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Get => "Get",
            Kind::Put => "Put",
            Kind::Fail => "Get fail",
            Kind::Deadline => "Get sleep:50, 10ms deadline",
            Kind::Stream => "Subscribe, dropped",
            Kind::Unknown => "Get, unknown namespace",
            Kind::Burst => "burst of Get sleep:5",
        }
    }

    /// The outcome (code) this kind is there to produce.
    pub fn expected(self) -> &'static str {
        match self {
            Kind::Get | Kind::Put => "OK",
            Kind::Fail => "FAILED_PRECONDITION",
            Kind::Deadline => "DEADLINE_EXCEEDED",
            Kind::Stream => STREAM_DROPPED,
            Kind::Unknown => "NOT_FOUND",
            Kind::Burst => "RESOURCE_EXHAUSTED",
        }
    }

    /// Whether a call of this kind may end with `outcome`: the one it is
    /// there for; OK, for a burst call that got a slot; or a policy's
    /// refusal (the concurrency or rate limit, and an open circuit: the
    /// default policy's breaker is on, and may open on a run of failures)
    /// for any call that reaches a pattern's namespace.
    pub fn allows(self, outcome: &Outcome) -> bool {
        let refused = matches!(
            (outcome.code, outcome.reason.as_str()),
            ("RESOURCE_EXHAUSTED", "CONCURRENCY_LIMIT" | "RATE_LIMITED")
                | ("UNAVAILABLE", "CIRCUIT_OPEN")
        );
        outcome.code == self.expected()
            || (self == Kind::Burst && outcome.code == "OK")
            || (self != Kind::Unknown && refused)
    }

    /// Calls one slot of this kind makes.
    pub fn calls(self) -> u64 {
        match self {
            Kind::Burst => BURST as u64,
            _ => 1,
        }
    }
}

/// The slots, cycled: per 32 slots 15 Gets, 5 Puts, 4 fails, 2 deadlines,
/// 2 dropped streams, 3 unknown namespaces and a burst (43 calls).
pub const MIX: [Kind; 32] = {
    use Kind::*;
    [
        Get, Put, Get, Fail, Get, Unknown, Get, Deadline, //
        Get, Put, Get, Stream, Get, Fail, Get, Put, //
        Get, Unknown, Get, Put, Get, Fail, Get, Deadline, //
        Get, Put, Get, Stream, Get, Fail, Unknown, Burst,
    ]
};

/// A Subscribe whose first message arrived, after which the client
/// dropped the stream (reset it).
pub const STREAM_DROPPED: &str = "STREAM_DROPPED";
/// A Subscribe that ended OK before sending anything (echo never does).
pub const STREAM_ENDED: &str = "STREAM_ENDED";
/// No answer within [`CALL_GUARD`].
pub const CLIENT_TIMEOUT: &str = "CLIENT_TIMEOUT";

/// How one call ended: a gRPC code name (or one of the pseudo-codes
/// above) and the `ErrorInfo` reason, when the status carried one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Outcome {
    pub code: &'static str,
    pub reason: String,
}

impl Outcome {
    fn plain(code: &'static str) -> Outcome {
        Outcome {
            code,
            reason: String::new(),
        }
    }

    fn of(status: &tonic::Status) -> Outcome {
        Outcome {
            code: trellis_proto::code_name(status.code()),
            reason: status
                .get_details_error_info()
                .map(|i| i.reason)
                .unwrap_or_default(),
        }
    }

    fn of_result<T>(r: Result<T, tonic::Status>) -> Outcome {
        match r {
            Ok(_) => Outcome::plain("OK"),
            Err(s) => Outcome::of(&s),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason.is_empty() {
            f.write_str(self.code)
        } else {
            write!(f, "{}/{}", self.code, self.reason)
        }
    }
}

/// Calls counted by kind and outcome.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub counts: BTreeMap<(Kind, Outcome), u64>,
}

impl Tally {
    fn record(&mut self, kind: Kind, outcome: Outcome) {
        *self.counts.entry((kind, outcome)).or_default() += 1;
    }

    pub fn add(&mut self, other: &Tally) {
        for (k, n) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += n;
        }
    }

    /// Calls counted.
    pub fn calls(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Calls of any kind that ended with `code`.
    pub fn of_code(&self, code: &str) -> u64 {
        self.counts
            .iter()
            .filter(|((_, o), _)| o.code == code)
            .map(|(_, n)| n)
            .sum()
    }

    /// Calls of `kind` that ended with `code`.
    pub fn of(&self, kind: Kind, code: &str) -> u64 {
        self.counts
            .iter()
            .filter(|((k, o), _)| *k == kind && o.code == code)
            .map(|(_, n)| n)
            .sum()
    }

    /// Outcomes their kind does not allow ([`Kind::allows`]), with counts.
    pub fn unexpected(&self) -> Vec<(Kind, Outcome, u64)> {
        self.counts
            .iter()
            .filter(|((k, o), _)| !k.allows(o))
            .map(|((k, o), n)| (*k, o.clone(), *n))
            .collect()
    }

    /// Every kind with the outcomes it had, one kind per line.
    pub fn matrix(&self) -> String {
        let mut out = String::new();
        for kind in Kind::ALL {
            let mut line = format!("  {:<30}", kind.name());
            for ((k, o), n) in &self.counts {
                if *k == kind {
                    line.push_str(&format!(" {o}: {n};"));
                }
            }
            out.push_str(line.trim_end_matches(';'));
            out.push('\n');
        }
        out
    }
}

/// Runs the mix against a proxy: [`IN_FLIGHT`] calls at a time (unless
/// told otherwise).
pub struct Workload {
    /// `host:port` of the gRPC listener.
    addr: String,
    /// The next call slot; kept across runs, so callers keep changing.
    slot: Arc<AtomicU64>,
    in_flight: usize,
}

impl Workload {
    pub fn new(proxy: &Proxy) -> Workload {
        Workload {
            addr: proxy.addr.trim_start_matches("http://").to_string(),
            slot: Arc::new(AtomicU64::new(0)),
            in_flight: IN_FLIGHT,
        }
    }

    /// Calls in flight at once instead of [`IN_FLIGHT`] (at least 1).
    pub fn in_flight(mut self, n: usize) -> Workload {
        self.in_flight = n.max(1);
        self
    }

    /// Makes `calls` calls (a burst may go over by up to `BURST - 1`) on
    /// [`CHANNELS`] fresh connections, closed again before it returns;
    /// returns once every call has ended.
    pub async fn run(&self, calls: u64) -> Tally {
        let mut channels = Vec::with_capacity(CHANNELS);
        for _ in 0..CHANNELS {
            channels.push(H2Channel::connect(&self.addr).await);
        }
        let issued = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..self.in_flight)
            .map(|w| {
                let channel = channels[w % CHANNELS].clone();
                let slot = self.slot.clone();
                let issued = issued.clone();
                tokio::spawn(async move {
                    let mut kv = KeyValueClient::new(channel.clone());
                    let mut pubsub = PubSubClient::new(channel);
                    let mut tally = Tally::default();
                    loop {
                        let s = slot.fetch_add(1, Ordering::Relaxed);
                        let kind = MIX[(s % MIX.len() as u64) as usize];
                        if issued.fetch_add(kind.calls(), Ordering::Relaxed) >= calls {
                            return tally;
                        }
                        let caller = format!("soak-{}", s / CALLS_PER_CALLER);
                        one(kind, &caller, &mut kv, &mut pubsub, &mut tally).await;
                    }
                })
            })
            .collect();
        drop(channels);
        let mut tally = Tally::default();
        for w in workers {
            tally.add(&w.await.expect("soak worker"));
        }
        tally
    }
}

fn request<T>(message: T, caller: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "x-client-id",
        caller.parse().expect("caller id is valid metadata"),
    );
    req
}

fn get(namespace: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: namespace.into(),
        key: key.into(),
    }
}

/// `call`'s outcome, or [`CLIENT_TIMEOUT`] when it hangs.
async fn guarded(call: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(CALL_GUARD, call)
        .await
        .unwrap_or_else(|_| Outcome::plain(CLIENT_TIMEOUT))
}

/// Makes the calls of one slot and counts how they ended.
async fn one(
    kind: Kind,
    caller: &str,
    kv: &mut KeyValueClient<H2Channel>,
    pubsub: &mut PubSubClient<H2Channel>,
    tally: &mut Tally,
) {
    let outcome = match kind {
        Kind::Get => {
            guarded(async {
                Outcome::of_result(kv.get(request(get(NAMESPACE, "soak"), caller)).await)
            })
            .await
        }
        Kind::Put => {
            let put = PutRequest {
                namespace: NAMESPACE.into(),
                key: "soak".into(),
                value: vec![b'v'; 100],
                ttl: None,
            };
            guarded(async { Outcome::of_result(kv.put(request(put, caller)).await) }).await
        }
        Kind::Fail => {
            guarded(async {
                Outcome::of_result(kv.get(request(get(NAMESPACE, "fail"), caller)).await)
            })
            .await
        }
        Kind::Deadline => {
            let mut req = request(
                get(NAMESPACE, &format!("sleep:{DEADLINE_SLEEP_MS}")),
                caller,
            );
            req.set_timeout(DEADLINE);
            guarded(async {
                match kv.get(req).await {
                    // tonic's own timer (CANCELLED "Timeout expired") fired
                    // before the proxy's DEADLINE_EXCEEDED arrived: the same
                    // ending, seen from the client's side first, which a
                    // loaded machine makes common.
                    Err(s)
                        if s.code() == tonic::Code::Cancelled
                            && s.message() == "Timeout expired" =>
                    {
                        Outcome {
                            code: "DEADLINE_EXCEEDED",
                            reason: "CLIENT_TIMER".into(),
                        }
                    }
                    r => Outcome::of_result(r),
                }
            })
            .await
        }
        Kind::Unknown => {
            guarded(async {
                Outcome::of_result(
                    kv.get(request(get(UNKNOWN_NAMESPACE, "soak"), caller))
                        .await,
                )
            })
            .await
        }
        Kind::Stream => {
            let sub = SubscribeRequest {
                namespace: NAMESPACE.into(),
                topic: "soak".into(),
                queue_group: String::new(),
            };
            guarded(async {
                match pubsub.subscribe(request(sub, caller)).await {
                    Err(s) => Outcome::of(&s),
                    Ok(res) => {
                        let mut stream = res.into_inner();
                        match stream.message().await {
                            // Dropping the stream here resets it.
                            Ok(Some(_)) => Outcome::plain(STREAM_DROPPED),
                            Ok(None) => Outcome::plain(STREAM_ENDED),
                            Err(s) => Outcome::of(&s),
                        }
                    }
                }
            })
            .await
        }
        Kind::Burst => {
            let key = format!("sleep:{BURST_SLEEP_MS}");
            let calls = (0..BURST).map(|_| {
                let mut kv = kv.clone();
                let req = request(get(NAMESPACE, &key), caller);
                guarded(async move { Outcome::of_result(kv.get(req).await) })
            });
            for outcome in futures::future::join_all(calls).await {
                tally.record(kind, outcome);
            }
            return;
        }
    };
    tally.record(kind, outcome);
}

/// A gRPC channel on one bare HTTP/2 connection (hyper's client
/// connection, driven by a task of its own), for tonic's generated
/// clients. The connection closes when the last clone is dropped.
#[derive(Clone)]
pub struct H2Channel {
    send: SendRequest<tonic::body::Body>,
    authority: http::uri::Authority,
}

impl H2Channel {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str) -> H2Channel {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake with the proxy");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Channel {
            send,
            authority: addr.parse().expect("host:port"),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // tonic's clients send the path alone; HTTP/2 wants scheme and authority.
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = http::Uri::from_parts(parts).expect("request URI");
        Box::pin(self.send.send_request(req))
    }
}

// --- the probe ---------------------------------------------------------------

/// One look at the proxy process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// VmRSS from /proc/<pid>/status, in KiB.
    pub rss_kib: u64,
    /// Entries in /proc/<pid>/fd.
    pub fds: u64,
    /// OS threads (`Threads:` in /proc/<pid>/status).
    pub threads: u64,
    /// `trellis_runtime_alive_tasks` from `/metrics` (counting the task
    /// serving that scrape).
    pub tasks: u64,
}

impl Sample {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    /// Open fds and alive tasks, the figures that must come back exactly.
    pub fn handles(&self) -> (u64, u64) {
        (self.fds, self.tasks)
    }
}

/// Reads the proxy's figures: /proc for memory, fds and threads, its
/// `/metrics` (a fresh HTTP/1.1 connection per scrape, closed by the
/// proxy) for tasks.
pub struct Probe {
    pid: u32,
    /// `host:port` of the HTTP listener.
    http: String,
}

/// How long fds and tasks must hold still for [`Probe::steady`].
const STILL_FOR: Duration = Duration::from_secs(1);
const STILL_STEP: Duration = Duration::from_millis(100);

impl Probe {
    pub fn new(proxy: &Proxy) -> Probe {
        let http = proxy
            .http
            .as_deref()
            .expect("the proxy's HTTP listener is on")
            .trim_start_matches("http://")
            .to_string();
        Probe {
            pid: proxy.pid(),
            http,
        }
    }

    pub async fn sample(&self) -> Sample {
        let tasks = self.tasks().await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read the proxy's /proc status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{}/status", self.pid))
        };
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("list the proxy's fds")
            .count() as u64;
        Sample {
            rss_kib: field("VmRSS:"),
            fds,
            threads: field("Threads:"),
            tasks,
        }
    }

    /// `trellis_runtime_alive_tasks`, scraped now.
    pub async fn tasks(&self) -> u64 {
        let mut tcp = tokio::net::TcpStream::connect(&self.http)
            .await
            .expect("connect to the proxy's HTTP listener");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n\r\n")
            .await
            .expect("send the scrape");
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.expect("read the scrape");
        let text = String::from_utf8_lossy(&answer);
        text.lines()
            .find_map(|l| l.strip_prefix(TASKS_METRIC)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {TASKS_METRIC} in the proxy's /metrics:\n{text}"))
    }

    /// A sample once open fds and tasks have held still for a second (the
    /// load before has quiesced): the baseline.
    pub async fn steady(&self) -> Sample {
        eventually("the proxy's fds and tasks to hold still", || async move {
            let first = self.sample().await;
            let steps = (STILL_FOR.as_millis() / STILL_STEP.as_millis()) as usize;
            for _ in 0..steps {
                tokio::time::sleep(STILL_STEP).await;
                if self.sample().await.handles() != first.handles() {
                    return None;
                }
            }
            Some(self.sample().await).filter(|s| s.handles() == first.handles())
        })
        .await
    }

    /// Samples until open fds and tasks are back to `base`'s, for at most
    /// `bound`: `Ok` with that sample, or `Err` with the last one.
    pub async fn settle(&self, base: &Sample, bound: Duration) -> Result<Sample, Sample> {
        let until = tokio::time::Instant::now() + bound;
        loop {
            let s = self.sample().await;
            if s.handles() == base.handles() {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= until {
                return Err(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Subscriptions the echo pattern holds open now (`Get subscriptions`,
/// through the proxy): 0 once every dropped stream's reset reached it.
/// `None` when the call fails: the namespace's circuit may be open (the
/// default policy's breaker counts DEADLINE_EXCEEDED, which the mix makes
/// plenty of), so wait with [`eventually`].
pub async fn open_subscriptions(proxy: &Proxy) -> Option<u64> {
    let channel = H2Channel::connect(proxy.addr.trim_start_matches("http://")).await;
    let value = KeyValueClient::new(channel)
        .get(get(NAMESPACE, "subscriptions"))
        .await
        .ok()?
        .into_inner()
        .value;
    String::from_utf8_lossy(&value).parse().ok()
}
