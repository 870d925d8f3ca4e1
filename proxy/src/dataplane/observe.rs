//! What the data plane tells operators, as two layers around the stack:
//!
//! - `Observe`, outermost: every call that reached the stack, refused ones
//!   included — `rpc_server_call_duration_seconds` from the call's arrival
//!   to the end of its response, and the one log line per call (target
//!   `trellis::calls`);
//! - `Hop`, just above `Forward`: the proxy → pattern hop —
//!   `rpc_client_call_duration_seconds` from sending to the end of the
//!   pattern's response.
//!
//! With traces on, `Observe` also opens the call's server span (its parent
//! read from the caller's `traceparent`) and `Hop` a client span under it,
//! whose context the pattern receives in place of the caller's.
//!
//! Both learn how a call ended from [`CallBody::on_end`], so a stream is
//! measured to its last message, and a client that goes away counts as
//! CANCELLED. With metrics off and the call log filtered out, each costs
//! a branch.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Response};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Level;

use super::body::CallBody;
use super::outcome::WhenDone;
use super::{Call, DataMethod};
use crate::config::{CallLog, CallLogLevel};
use crate::error::{ApiError, code_name};
use crate::metadata::trace_id;
use crate::metrics::{CallKey, Metrics, Side};
use crate::traces;
use opentelemetry::Context as TraceContext;
use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::SdkTracer;

/// What the two layers share: where figures go and what is logged.
pub struct Telemetry {
    /// `None` with `telemetry.metrics: false`.
    metrics: Option<Arc<Metrics>>,
    /// `None` while traces are off.
    tracer: Option<SdkTracer>,
    call_log: CallLog,
    /// Namespace → pattern, for the log line.
    patterns: HashMap<String, String>,
}

impl Telemetry {
    pub fn new(
        metrics: Option<Arc<Metrics>>,
        tracer: Option<SdkTracer>,
        call_log: CallLog,
        patterns: HashMap<String, String>,
    ) -> Self {
        Telemetry {
            metrics,
            tracer,
            call_log,
            patterns,
        }
    }

    /// The same sinks, with a new namespace → pattern map (a reload).
    pub fn with_patterns(&self, patterns: HashMap<String, String>) -> Self {
        Telemetry {
            metrics: self.metrics.clone(),
            tracer: self.tracer.clone(),
            call_log: self.call_log.clone(),
            patterns,
        }
    }

    /// Nothing recorded, nothing logged (for tests and benchmarks).
    pub fn off() -> Self {
        Telemetry::new(
            None,
            None,
            CallLog {
                errors: CallLogLevel::Off,
                successes: CallLogLevel::Off,
            },
            HashMap::new(),
        )
    }

    fn key(&self, namespace: &str, method: &DataMethod) -> Option<CallKey> {
        self.metrics
            .as_ref()?
            .calls
            .key(namespace, &method.full_name)
    }

    /// A call refused at the edge, before it became a `Call`.
    pub fn refused(
        &self,
        path: &str,
        e: &ApiError,
        received: Instant,
        request_id: Option<&HeaderValue>,
    ) {
        self.log(path, "", e.code, received.elapsed(), request_id, None);
    }

    /// The metrics, for layers that record their own (policies).
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_deref()
    }

    /// The metrics, for what outlives a call (the circuits).
    pub fn metrics_arc(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
    }

    fn pattern_of(&self, namespace: &str) -> &str {
        self.patterns.get(namespace).map_or("", String::as_str)
    }

    /// One call ended: its metrics and its log line.
    fn ended(&self, record: &Record, code: Code) {
        let elapsed = record.received.elapsed();
        if let (Some(metrics), Some(key)) = (&self.metrics, record.key) {
            metrics.calls.observe(key, Side::Server, code, elapsed);
        }
        if let Some(span) = &record.span {
            traces::end(span, code);
        }
        self.log(
            &record.method.full_name,
            &record.namespace,
            code,
            elapsed,
            record.request_id.as_ref(),
            record.trace_id.as_deref(),
        );
    }

    fn log(
        &self,
        method: &str,
        namespace: &str,
        code: Code,
        elapsed: Duration,
        request_id: Option<&HeaderValue>,
        trace_id: Option<&str>,
    ) {
        let level = if code == Code::Ok {
            self.call_log.successes
        } else {
            self.call_log.errors
        };
        macro_rules! line {
            ($lvl:expr) => {
                if tracing::enabled!(target: "trellis::calls", $lvl) {
                    let pattern = self.pattern_of(namespace);
                    let request_id = request_id.and_then(|v| v.to_str().ok()).unwrap_or("");
                    let trace_id = trace_id.unwrap_or("");
                    tracing::event!(
                        target: "trellis::calls",
                        $lvl,
                        method,
                        namespace,
                        pattern,
                        code = code_name(code),
                        ms = elapsed.as_secs_f64() * 1000.0,
                        request_id,
                        trace_id,
                        "call"
                    );
                }
            };
        }
        match level {
            CallLogLevel::Off => {}
            CallLogLevel::Error => line!(Level::ERROR),
            CallLogLevel::Warn => line!(Level::WARN),
            CallLogLevel::Info => line!(Level::INFO),
            CallLogLevel::Debug => line!(Level::DEBUG),
            CallLogLevel::Trace => line!(Level::TRACE),
        }
    }
}

/// One call's facts, kept until it ends.
struct Record {
    method: Arc<DataMethod>,
    namespace: Arc<str>,
    received: Instant,
    key: Option<CallKey>,
    request_id: Option<HeaderValue>,
    /// The caller's, or the server span's when traces are on.
    trace_id: Option<String>,
    /// The server span, with traces on.
    span: Option<TraceContext>,
}

pub struct ObserveLayer {
    telemetry: Arc<Telemetry>,
}

impl ObserveLayer {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        ObserveLayer { telemetry }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

impl<S> Service<Call> for Observe<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = WhenDone<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let t = &self.telemetry;
        let span = t.tracer.as_ref().map(|tracer| {
            let parent = traces::extract(&call.headers);
            traces::start(
                tracer,
                &parent,
                SpanKind::Server,
                &call.method.full_name,
                &call.namespace,
                t.pattern_of(&call.namespace),
            )
        });
        let trace_id = match &span {
            Some(cx) => traces::trace_id(cx),
            None => call
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(trace_id)
                .map(str::to_string),
        };
        call.trace = span.clone();
        let record = Record {
            key: t.key(&call.namespace, &call.method),
            method: call.method.clone(),
            namespace: call.namespace.clone(),
            received: call.received,
            request_id: call.headers.get(crate::metadata::REQUEST_ID).cloned(),
            trace_id,
            span,
        };
        let telemetry = self.telemetry.clone();
        WhenDone::new(
            self.inner.call(call),
            Box::new(move |code| telemetry.ended(&record, code)),
        )
    }
}

/// `Hop`: the proxy → pattern hop's duration, and its client span.
pub struct HopLayer {
    telemetry: Arc<Telemetry>,
}

impl HopLayer {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        HopLayer { telemetry }
    }
}

impl<S> Layer<S> for HopLayer {
    type Service = Hop<S>;
    fn layer(&self, inner: S) -> Hop<S> {
        Hop {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Hop<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
}

impl<S> Service<Call> for Hop<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = WhenDone<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let t = &self.telemetry;
        let end = t.metrics.as_ref().and_then(|m| {
            let key = m.calls.key(&call.namespace, &call.method.full_name)?;
            Some((m.clone(), key, Instant::now()))
        });
        let span = match (&t.tracer, &call.trace) {
            (Some(tracer), Some(server)) => {
                let span = traces::start(
                    tracer,
                    server,
                    SpanKind::Client,
                    &call.method.full_name,
                    &call.namespace,
                    t.pattern_of(&call.namespace),
                );
                // The pattern continues the trace under the hop's span.
                traces::inject(&span, &mut call.headers);
                Some(span)
            }
            _ => None,
        };
        if end.is_none() && span.is_none() {
            return WhenDone::passing(self.inner.call(call));
        }
        WhenDone::new(
            self.inner.call(call),
            Box::new(move |code| {
                if let Some((metrics, key, sent)) = end {
                    metrics
                        .calls
                        .observe(key, Side::Client, code, sent.elapsed());
                }
                if let Some(span) = span {
                    traces::end(&span, code);
                }
            }),
        )
    }
}
