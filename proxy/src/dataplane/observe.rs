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
//! Both learn how a call ended from [`CallBody::on_end`], so a stream is
//! measured to its last message, and a client that goes away counts as
//! CANCELLED. With metrics off and the call log filtered out, each costs
//! a branch.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Response};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service};
use tracing::Level;

use super::body::CallBody;
use super::{Call, DataMethod};
use crate::config::{CallLog, CallLogLevel};
use crate::error::{ApiError, code_name};
use crate::metadata::trace_id;
use crate::metrics::{CallKey, Metrics, Side};

/// What the two layers share: where figures go and what is logged.
pub struct Telemetry {
    /// `None` with `telemetry.metrics: false`.
    metrics: Option<Arc<Metrics>>,
    call_log: CallLog,
    /// Namespace → pattern, for the log line.
    patterns: HashMap<String, String>,
}

impl Telemetry {
    pub fn new(
        metrics: Option<Arc<Metrics>>,
        call_log: CallLog,
        patterns: HashMap<String, String>,
    ) -> Self {
        Telemetry {
            metrics,
            call_log,
            patterns,
        }
    }

    /// Nothing recorded, nothing logged (for tests and benchmarks).
    pub fn off() -> Self {
        Telemetry::new(
            None,
            CallLog {
                errors: CallLogLevel::Off,
                successes: CallLogLevel::Off,
            },
            HashMap::new(),
        )
    }

    /// The metrics the calls go to, if any.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
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

    /// One call ended: its metrics and its log line.
    fn ended(&self, record: &Record, code: Code) {
        let elapsed = record.received.elapsed();
        if let (Some(metrics), Some(key)) = (&self.metrics, record.key) {
            metrics.calls.observe(key, Side::Server, code, elapsed);
        }
        self.log(
            &record.method.full_name,
            &record.namespace,
            code,
            elapsed,
            record.request_id.as_ref(),
            record.traceparent.as_ref(),
        );
    }

    fn log(
        &self,
        method: &str,
        namespace: &str,
        code: Code,
        elapsed: Duration,
        request_id: Option<&HeaderValue>,
        traceparent: Option<&HeaderValue>,
    ) {
        let level = if code == Code::Ok {
            self.call_log.successes
        } else {
            self.call_log.errors
        };
        macro_rules! line {
            ($lvl:expr) => {
                if tracing::enabled!(target: "trellis::calls", $lvl) {
                    let pattern = self.patterns.get(namespace).map_or("", String::as_str);
                    let text = |v: Option<&HeaderValue>| {
                        v.and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
                    };
                    let trace_id = traceparent
                        .and_then(|v| v.to_str().ok())
                        .and_then(trace_id)
                        .unwrap_or("");
                    tracing::event!(
                        target: "trellis::calls",
                        $lvl,
                        method,
                        namespace,
                        pattern,
                        code = code_name(code),
                        ms = elapsed.as_secs_f64() * 1000.0,
                        request_id = %text(request_id),
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
    traceparent: Option<HeaderValue>,
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
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let record = Record {
            key: self.telemetry.key(&call.namespace, &call.method),
            method: call.method.clone(),
            namespace: call.namespace.clone(),
            received: call.received,
            request_id: call.headers.get(crate::metadata::REQUEST_ID).cloned(),
            traceparent: call.headers.get("traceparent").cloned(),
        };
        Observed {
            inner: self.inner.call(call),
            end: Some((self.telemetry.clone(), record)),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        #[pin]
        inner: F,
        end: Option<(Arc<Telemetry>, Record)>,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response<CallBody>, ApiError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some((telemetry, record)) = this.end.take() else {
            return Poll::Ready(result);
        };
        match result {
            Err(e) => {
                telemetry.ended(&record, e.code);
                Poll::Ready(Err(e))
            }
            Ok(mut response) => {
                response
                    .body_mut()
                    .on_end(Box::new(move |code| telemetry.ended(&record, code)));
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// `Hop`: the proxy → pattern hop's duration.
pub struct HopLayer {
    metrics: Option<Arc<Metrics>>,
}

impl HopLayer {
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        HopLayer { metrics }
    }
}

impl<S> Layer<S> for HopLayer {
    type Service = Hop<S>;
    fn layer(&self, inner: S) -> Hop<S> {
        Hop {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Hop<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

impl<S> Service<Call> for Hop<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Hopped<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let end = self.metrics.as_ref().and_then(|m| {
            let key = m.calls.key(&call.namespace, &call.method.full_name)?;
            Some((m.clone(), key, Instant::now()))
        });
        Hopped {
            inner: self.inner.call(call),
            end,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Hopped<F> {
        #[pin]
        inner: F,
        end: Option<(Arc<Metrics>, CallKey, Instant)>,
    }
}

impl<F> Future for Hopped<F>
where
    F: Future<Output = Result<Response<CallBody>, ApiError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some((metrics, key, sent)) = this.end.take() else {
            return Poll::Ready(result);
        };
        match result {
            Err(e) => {
                metrics
                    .calls
                    .observe(key, Side::Client, e.code, sent.elapsed());
                Poll::Ready(Err(e))
            }
            Ok(mut response) => {
                response.body_mut().on_end(Box::new(move |code| {
                    metrics
                        .calls
                        .observe(key, Side::Client, code, sent.elapsed())
                }));
                Poll::Ready(Ok(response))
            }
        }
    }
}
