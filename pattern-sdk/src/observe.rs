//! What a pattern does against its backend, measured: a latency histogram
//! and a `tracing` span per backend operation, the connection pool's
//! figures, and the open subscriptions of a pub/sub pattern. The proxy
//! fetches them with `Lifecycle/Metrics` when it is scraped and serves them
//! in its own `/metrics` with a `pattern` label (docs/pattern-protocol.md).
//!
//! A pattern gets its handles from the [`InitContext`](crate::InitContext)
//! in `init` and keeps them:
//!
//! ```no_run
//! # use pattern_sdk::{Error, InitContext};
//! # use pattern_sdk::observe::{Backend, PoolStatus};
//! # async fn demo(ctx: InitContext) -> Result<(), Error> {
//! let backend: Backend = ctx.backend("redis");
//! // Every backend call: timed, counted by outcome, traced.
//! let value: Result<Option<String>, Error> = backend
//!     .call("GET", async { Ok(Some("v".to_string())) })
//!     .await;
//! // The pool's figures, read at scrape time.
//! let pool = ctx.pool(|| PoolStatus { idle: 3, in_use: 1, max: 16, pending: 0 });
//! pool.waited(); // a request found no free connection and waited
//! # Ok(())
//! # }
//! ```
//!
//! Metrics (each also gets `pattern="<name>"` from the proxy):
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `pattern_backend_operation_duration_seconds` | histogram | `operation`, `outcome` (`ok`/`error`) | one backend operation, from its start to its answer |
//! | `pattern_backend_operations_in_flight` | gauge | | backend operations started and not yet finished |
//! | `pattern_pool_connections` | gauge | `state` (`idle`/`in_use`) | the pool's open connections |
//! | `pattern_pool_max_connections` | gauge | | the most connections the pool opens |
//! | `pattern_pool_pending_requests` | gauge | | requests waiting for a connection now |
//! | `pattern_pool_waits_total` | counter | | requests that found no free connection and waited |
//! | `pattern_pool_timeouts_total` | counter | | requests that gave up waiting for a connection |
//! | `pattern_subscriptions` | gauge | | open subscriptions (pub/sub patterns) |
//!
//! Labels are bounded: operations are `&'static str` names chosen by the
//! pattern's code, never keys, values or ids.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::Instrument;
use tracing::field::Empty;

/// Bucket bounds, in seconds, for backend operations: sub-millisecond
/// buckets (a Redis command on the same host takes ~100 µs) below the
/// OpenTelemetry defaults `.005 … 10`. The same bounds as the proxy's call
/// histograms, so the two can be read side by side.
pub const OPERATION_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

// prometheus-client's own `Histogram` takes a mutex on every observation.
// The proxy records its per-call histograms with a lock-free one of its
// own, because it records one on every data call in its hot loop; the SDK
// cannot depend on the proxy, and a backend operation (a network round
// trip, ≥ 100 µs) costs thousands of times what an uncontended mutex does,
// so the SDK uses the library's histogram rather than a copy of the proxy's.
type Operations = Family<OperationLabels, Histogram, fn() -> Histogram>;

fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_SECONDS.iter().copied())
}

/// Every metric of one pattern process. One per [`Server`](crate::Server);
/// an [`InitContext::new`](crate::InitContext::new) made by a test gets a
/// detached one that is recorded and never served.
pub(crate) struct Metrics {
    operations: Operations,
    in_flight: Gauge,
    subscriptions: Gauge,
    /// Whether the PubSub service is served (only then is
    /// `pattern_subscriptions` exported).
    pub_sub: std::sync::atomic::AtomicBool,
    pool: Mutex<Option<PoolSource>>,
}

/// A pool's figures: read at scrape time from the pattern's closure, plus
/// the counters the pattern bumps through [`Pool`].
struct PoolSource {
    status: Box<dyn Fn() -> PoolStatus + Send + Sync>,
    waits: Counter,
    timeouts: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            operations: Family::new_with_constructor(operation_histogram),
            in_flight: Gauge::default(),
            subscriptions: Gauge::default(),
            pub_sub: false.into(),
            pool: Mutex::new(None),
        }
    }

    pub(crate) fn backend(&self, system: &'static str) -> Backend {
        Backend {
            system,
            operations: self.operations.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    pub(crate) fn pool(&self, status: impl Fn() -> PoolStatus + Send + Sync + 'static) -> Pool {
        let source = PoolSource {
            status: Box::new(status),
            waits: Counter::default(),
            timeouts: Counter::default(),
        };
        let pool = Pool {
            waits: source.waits.clone(),
            timeouts: source.timeouts.clone(),
        };
        *self.pool.lock().unwrap_or_else(PoisonError::into_inner) = Some(source);
        pool
    }

    /// Counts one subscription as open until the guard is dropped, and
    /// exports `pattern_subscriptions` from now on.
    pub(crate) fn subscription(&self) -> OpenSubscription {
        self.serves_pub_sub();
        self.subscriptions.inc();
        OpenSubscription(self.subscriptions.clone())
    }

    /// Exports `pattern_subscriptions` (0 until someone subscribes).
    pub(crate) fn serves_pub_sub(&self) {
        self.pub_sub
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The text for `Lifecycle/Metrics`: the Prometheus / OpenMetrics text
    /// exposition, without `# EOF`.
    pub(crate) fn encode(&self) -> String {
        let mut registry = Registry::default();
        registry.register(
            "pattern_backend_operation_duration_seconds",
            "Duration of the pattern's operations against its backend, by operation and outcome",
            self.operations.clone(),
        );
        registry.register(
            "pattern_backend_operations_in_flight",
            "Backend operations started and not yet finished",
            self.in_flight.clone(),
        );
        if self.pub_sub.load(std::sync::atomic::Ordering::Relaxed) {
            registry.register(
                "pattern_subscriptions",
                "Open subscriptions",
                self.subscriptions.clone(),
            );
        }
        if let Some(pool) = &*self.pool.lock().unwrap_or_else(PoisonError::into_inner) {
            let status = (pool.status)();
            let connections: Family<StateLabels, Gauge> = Family::default();
            connections
                .get_or_create(&StateLabels { state: "idle" })
                .set(gauge_value(status.idle));
            connections
                .get_or_create(&StateLabels { state: "in_use" })
                .set(gauge_value(status.in_use));
            registry.register(
                "pattern_pool_connections",
                "Open connections of the backend connection pool, by state",
                connections,
            );
            let gauge = |v: u64| {
                let g: Gauge = Gauge::default();
                g.set(gauge_value(v));
                g
            };
            registry.register(
                "pattern_pool_max_connections",
                "The most connections the pool opens",
                gauge(status.max),
            );
            registry.register(
                "pattern_pool_pending_requests",
                "Requests waiting for a pool connection now",
                gauge(status.pending),
            );
            registry.register(
                "pattern_pool_waits",
                "Requests that found no free pool connection and waited for one",
                pool.waits.clone(),
            );
            registry.register(
                "pattern_pool_timeouts",
                "Requests that gave up waiting for a pool connection",
                pool.timeouts.clone(),
            );
        }
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in a metric, and the scrape then shows what was written so far.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
        out
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Keeps one subscription counted in `pattern_subscriptions`.
pub(crate) struct OpenSubscription(Gauge);

impl Drop for OpenSubscription {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One backend a pattern talks to, named by its OpenTelemetry
/// `db.system.name` (`redis`, `postgresql`, `nats`, …). Cheap to clone; get
/// it from [`InitContext::backend`](crate::InitContext::backend).
#[derive(Clone)]
pub struct Backend {
    system: &'static str,
    operations: Operations,
    in_flight: Gauge,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// The `db.system.name` it was made with.
    pub fn system(&self) -> &'static str {
        self.system
    }

    /// Runs `op` as the backend operation `operation` (a low-cardinality
    /// name such as `GET` or `SELECT`, never built from request data):
    /// inside a span (see [`Backend::start`]), timed into
    /// `pattern_backend_operation_duration_seconds` with `outcome="ok"` for
    /// `Ok` and `"error"` for `Err`. Dropped before it finishes (the caller
    /// gave up), it counts as an error.
    pub async fn call<T, E>(
        &self,
        operation: &'static str,
        op: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let guard = self.start(operation);
        let result = op.instrument(guard.span().clone()).await;
        guard.finish(&result);
        result
    }

    /// Starts timing `operation` by hand, for code that cannot be wrapped
    /// in one future (e.g. a subscription set up in steps): finish it with
    /// [`Operation::finish`], [`Operation::ok`] or [`Operation::error`].
    /// Dropping it unfinished counts as an error (`error.type` `cancelled`).
    ///
    /// Its span is `backend` at `INFO`, with the OpenTelemetry database
    /// fields `db.system.name` and `db.operation.name`, `otel.kind =
    /// "client"` and `otel.name` = the operation (the span's name when
    /// exported); on an error also `error.type` and `otel.status_code =
    /// "ERROR"`.
    pub fn start(&self, operation: &'static str) -> Operation {
        let span = tracing::info_span!(
            "backend",
            otel.name = operation,
            otel.kind = "client",
            db.system.name = self.system,
            db.operation.name = operation,
            error.type = Empty,
            otel.status_code = Empty,
        );
        self.in_flight.inc();
        Operation {
            backend: self.clone(),
            operation,
            span,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Backend operations started and not yet finished, e.g. for a
    /// multiplexed connection's [`PoolStatus`].
    pub fn in_flight(&self) -> u64 {
        u64::try_from(self.in_flight.get()).unwrap_or(0)
    }
}

/// One backend operation being timed; see [`Backend::start`].
#[must_use = "an Operation measures until it is finished or dropped"]
pub struct Operation {
    backend: Backend,
    operation: &'static str,
    span: tracing::Span,
    started: Instant,
    finished: bool,
}

impl std::fmt::Debug for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operation")
            .field("system", &self.backend.system)
            .field("operation", &self.operation)
            .finish_non_exhaustive()
    }
}

impl Operation {
    /// The operation's span, to enter or to instrument futures with.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records `result`: `ok` for `Ok`, `error` for `Err` (with the
    /// error's type name as `error.type`).
    pub fn finish<T, E>(self, result: &Result<T, E>) {
        match result {
            Ok(_) => self.ok(),
            Err(_) => self.error(std::any::type_name::<E>()),
        }
    }

    /// Records a success.
    pub fn ok(mut self) {
        self.record("ok");
    }

    /// Records a failure; `error_type` is a low-cardinality class of it
    /// (OpenTelemetry's `error.type`, e.g. `timeout`).
    pub fn error(mut self, error_type: &str) {
        self.fail(error_type);
    }

    fn fail(&mut self, error_type: &str) {
        self.span.record("error.type", error_type);
        self.span.record("otel.status_code", "ERROR");
        self.record("error");
    }

    fn record(&mut self, outcome: &'static str) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.backend.in_flight.dec();
        self.backend
            .operations
            .get_or_create(&OperationLabels {
                operation: self.operation,
                outcome,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        if !self.finished {
            self.fail("cancelled");
        }
    }
}

/// A connection pool's figures at one moment, as the pattern's closure
/// given to [`InitContext::pool`](crate::InitContext::pool) reports them at
/// scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Open connections nobody is using.
    pub idle: u64,
    /// Open connections checked out by a request.
    pub in_use: u64,
    /// The most connections the pool opens.
    pub max: u64,
    /// Requests waiting for a connection now.
    pub pending: u64,
}

/// The counters of the pattern's connection pool; see
/// [`InitContext::pool`](crate::InitContext::pool). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Pool {
    waits: Counter,
    timeouts: Counter,
}

impl Pool {
    /// A request found no free connection (and the pool at its maximum)
    /// and waited for one.
    pub fn waited(&self) {
        self.waits.inc();
    }

    /// A request gave up waiting for a connection.
    pub fn timed_out(&self) {
        self.timeouts.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc as StdArc;

    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Subscriber;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::{Context, SubscriberExt};

    use super::*;

    /// Sample lines of `text` starting with `prefix`.
    fn samples<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[tokio::test]
    async fn an_operation_is_timed_and_counted_by_outcome() {
        let metrics = Metrics::new();
        let backend = metrics.backend("redis");
        let ok: Result<u8, String> = backend.call("GET", async { Ok(1) }).await;
        assert_eq!(ok, Ok(1));
        let _: Result<u8, String> = backend.call("GET", async { Ok(2) }).await;
        let err: Result<u8, String> = backend.call("SET", async { Err("no".into()) }).await;
        assert!(err.is_err());
        assert_eq!(backend.in_flight(), 0);

        let text = metrics.encode();
        assert!(
            text.contains("# TYPE pattern_backend_operation_duration_seconds histogram"),
            "{text}"
        );
        let mut counts = samples(&text, "pattern_backend_operation_duration_seconds_count");
        counts.sort();
        assert_eq!(
            counts,
            [
                r#"pattern_backend_operation_duration_seconds_count{operation="GET",outcome="ok"} 2"#,
                r#"pattern_backend_operation_duration_seconds_count{operation="SET",outcome="error"} 1"#,
            ],
            "{text}"
        );
        assert!(
            text.contains(r#"le="0.0001""#),
            "sub-millisecond buckets: {text}"
        );
        // Nothing a KV pattern without a pool does not have.
        assert!(!text.contains("pattern_subscriptions"), "{text}");
        assert!(!text.contains("pattern_pool"), "{text}");
    }

    #[tokio::test]
    async fn a_dropped_operation_is_an_error_and_leaves_no_flight() {
        let metrics = Metrics::new();
        let backend = metrics.backend("redis");
        let call = backend.call("GET", std::future::pending::<Result<(), String>>());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(5), call)
                .await
                .is_err()
        );
        assert_eq!(backend.in_flight(), 0);
        let guard = backend.start("SCAN");
        assert_eq!(backend.in_flight(), 1);
        drop(guard);
        let text = metrics.encode();
        for op in ["GET", "SCAN"] {
            let want = format!(
                r#"pattern_backend_operation_duration_seconds_count{{operation="{op}",outcome="error"}} 1"#
            );
            assert!(text.contains(&want), "{want} in {text}");
        }
    }

    #[test]
    fn pool_figures_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        let in_use = StdArc::new(std::sync::atomic::AtomicU64::new(1));
        let pool = metrics.pool({
            let in_use = StdArc::clone(&in_use);
            move || PoolStatus {
                idle: 2,
                in_use: in_use.load(std::sync::atomic::Ordering::Relaxed),
                max: 16,
                pending: 0,
            }
        });
        pool.waited();
        pool.waited();
        pool.timed_out();
        in_use.store(5, std::sync::atomic::Ordering::Relaxed);
        let text = metrics.encode();
        for want in [
            r#"pattern_pool_connections{state="idle"} 2"#,
            r#"pattern_pool_connections{state="in_use"} 5"#,
            "pattern_pool_max_connections 16",
            "pattern_pool_pending_requests 0",
            "pattern_pool_waits_total 2",
            "pattern_pool_timeouts_total 1",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} in {text}");
        }
    }

    #[test]
    fn subscriptions_are_counted_while_open() {
        let metrics = Metrics::new();
        metrics.serves_pub_sub();
        assert!(metrics.encode().contains("\npattern_subscriptions 0\n"));
        let a = metrics.subscription();
        let b = metrics.subscription();
        assert!(metrics.encode().contains("\npattern_subscriptions 2\n"));
        drop(a);
        drop(b);
        assert!(metrics.encode().contains("\npattern_subscriptions 0\n"));
    }

    /// Records every span's name and fields, as an OpenTelemetry layer
    /// would see them, in the order the spans were made.
    #[derive(Clone, Default)]
    struct Spans(StdArc<Mutex<Vec<SpanSeen>>>);

    /// A span's id, name and fields.
    type SpanSeen = (u64, String, HashMap<String, String>);

    struct Fields<'a>(&'a mut HashMap<String, String>);

    impl tracing::field::Visit for Fields<'_> {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.insert(field.name().into(), value.into());
        }
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().into(), format!("{value:?}"));
        }
    }

    impl<S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>> Layer<S> for Spans {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            let name = attrs.metadata().name().to_string();
            self.0.lock().unwrap().push((id.into_u64(), name, fields));
        }

        fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
            let mut spans = self.0.lock().unwrap();
            // Ids are reused once a span closes: the latest one is this span.
            if let Some((_, _, fields)) = spans.iter_mut().rev().find(|s| s.0 == id.into_u64()) {
                values.record(&mut Fields(fields));
            }
        }
    }

    #[test]
    fn each_operation_has_a_span_with_the_database_conventions() {
        // tracing caches each callsite's interest process-wide; a test on
        // another thread, with no subscriber, can cache "never" for these
        // callsites in the instant before this test's subscriber is seen.
        // That race is tracing's, not the code's: run again (a bounded
        // number of times) when nothing at all was recorded.
        let run = || {
            let spans = Spans::default();
            let subscriber = tracing_subscriber::registry().with(spans.clone());
            tracing::subscriber::with_default(subscriber, || {
                tracing::callsite::rebuild_interest_cache();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let metrics = Metrics::new();
                let backend = metrics.backend("redis");
                runtime.block_on(async {
                    let _: Result<(), String> = backend
                        .call("GET", async {
                            tracing::info!("inside");
                            Ok(())
                        })
                        .await;
                    let _: Result<(), String> =
                        backend.call("EVALSHA", async { Err("boom".into()) }).await;
                });
            });
            spans
        };
        let spans = (0..5)
            .map(|_| run())
            .find(|s| !s.0.lock().unwrap().is_empty())
            .unwrap_or_default();
        let spans = spans.0.lock().unwrap().clone();
        let backend_spans: Vec<_> = spans.iter().filter(|(_, n, _)| n == "backend").collect();
        assert_eq!(backend_spans.len(), 2, "{spans:?}");
        let (_, _, get) = backend_spans[0];
        assert_eq!(get["db.system.name"], "redis");
        assert_eq!(get["db.operation.name"], "GET");
        assert_eq!(get["otel.name"], "GET");
        assert_eq!(get["otel.kind"], "client");
        assert!(!get.contains_key("error.type"), "{get:?}");
        let (_, _, eval) = backend_spans[1];
        assert_eq!(eval["db.operation.name"], "EVALSHA");
        assert_eq!(eval["otel.status_code"], "ERROR");
        assert_eq!(eval["error.type"], "alloc::string::String");
    }
}
