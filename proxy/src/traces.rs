//! OpenTelemetry traces: a server span for every data call (named after
//! its method, `trellis.data.v1.KeyValue/Get`), a client span for the hop
//! to the pattern, and the W3C trace context (`traceparent`/`tracestate`)
//! read from the caller and written, as the client span's, into the call
//! the pattern receives. Spans go to an OTLP/gRPC collector through a
//! batch processor on a thread of its own, so exporting never runs on the
//! proxy's request threads.
//!
//! The data plane makes its spans with the OpenTelemetry API directly,
//! not through `tracing` spans: with traces off nothing is made at all
//! (one branch per call), and a span's kind, parent and end are exactly
//! the call's.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tonic::Code;

use crate::config::Traces;
use crate::error::code_name;

/// The exporter and the tracer the data plane makes spans with.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// Starts exporting to the configured collector; `Ok(None)` when traces
/// are off. Call inside the runtime (the exporter's channel lives there).
pub fn init(config: &Traces) -> Result<Option<Tracing>, String> {
    let Some(endpoint) = &config.endpoint else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("telemetry.traces.endpoint {endpoint:?}: {e}"))?;
    // Exports from a thread of its own (OTel's current-thread runtime
    // spawns one): the proxy's runtime may be a single thread that must
    // not wait on a collector.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::TokioCurrentThread,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.ratio(),
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service().to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("trellis");
    Ok(Some(Tracing { provider, tracer }))
}

impl Tracing {
    pub fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// Exports what is left. Blocks: call from a blocking thread.
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// The caller's trace context, from the call's headers.
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Writes `cx`'s `traceparent`/`tracestate` into `headers`, replacing the
/// caller's.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
}

/// A span for one call, started under `parent`.
pub fn start(
    tracer: &SdkTracer,
    parent: &Context,
    kind: SpanKind,
    method: &str,
    namespace: &str,
    pattern: &str,
) -> Context {
    let span = tracer
        .span_builder(method.to_string())
        .with_kind(kind)
        .with_attributes([
            KeyValue::new("rpc.system.name", "grpc"),
            KeyValue::new("rpc.method", method.to_string()),
            KeyValue::new("trellis.namespace", namespace.to_string()),
            KeyValue::new("trellis.pattern", pattern.to_string()),
        ])
        .start_with_context(tracer, parent);
    parent.with_span(span)
}

/// Ends a call's span with its status code; codes that mean the server
/// failed (as the OTel RPC conventions list them) mark the span an error.
pub fn end(cx: &Context, code: Code) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("rpc.response.status_code", code_name(code)));
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.set_status(Status::error(code_name(code)));
    }
    span.end();
}

/// The trace id of a context's span, as 32 hex digits, if it has one.
pub fn trace_id(cx: &Context) -> Option<String> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_round_trips_through_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let cx = extract(&h);
        assert_eq!(
            trace_id(&cx).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let mut out = HeaderMap::new();
        inject(&cx, &mut out);
        assert_eq!(
            out["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(trace_id(&extract(&HeaderMap::new())), None);
    }
}
