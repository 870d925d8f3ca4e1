//! Traces continue into the pattern. When the proxy exports traces it gives
//! each pattern the standard OpenTelemetry variables
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER_ARG`,
//! `OTEL_SERVICE_NAME`); the SDK then exports the `tracing` spans of
//! `pattern_sdk` — one server span per data call, whose parent is the
//! proxy's span from the call's `traceparent`, and the backend spans of
//! [`crate::observe`] — over OTLP/gRPC. Without the variables nothing is
//! exported and the spans cost what any `tracing` span costs.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tonic::metadata::MetadataMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exporter, kept so that its last spans are flushed at exit.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The `tracing` layer that exports `pattern_sdk` spans, when the
/// environment names a collector. Call inside the runtime.
pub(crate) fn layer<S>() -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("traces are off: OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}");
            return None;
        }
    };
    let ratio = var("OTEL_TRACES_SAMPLER_ARG")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|r| (0.0..=1.0).contains(r))
        .unwrap_or(1.0);
    let service = var("OTEL_SERVICE_NAME")
        .or_else(|| var(trellis_proto::protocol::env::NAME))
        .unwrap_or_else(|| "pattern".into());
    // Exports from a thread of its own, off the pattern's request threads.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::TokioCurrentThread,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("pattern-sdk");
    let _ = PROVIDER.set(provider);
    // Only the SDK's spans (calls and backend operations) become traces;
    // whatever else a pattern opens stays a log span.
    let only_sdk =
        tracing_subscriber::filter::Targets::new().with_target("pattern_sdk", tracing::Level::INFO);
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_sdk),
    )
}

/// Whether spans are exported.
pub(crate) fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Flushes the spans not exported yet. Blocks: call from a blocking thread.
pub(crate) fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// Makes `span` a child of the caller's span, from the call's
/// `traceparent`/`tracestate`.
pub(crate) fn continue_trace(span: &tracing::Span, metadata: &MetadataMap) {
    if enabled() {
        let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
        let _ = span.set_parent(parent);
    }
}

/// The trace id in a call's `traceparent`, for log lines, whether or not
/// spans are exported.
pub(crate) fn trace_id(metadata: &MetadataMap) -> &str {
    metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|tp| tp.split('-').nth(1))
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or("")
}

struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_comes_from_traceparent() {
        let mut md = MetadataMap::new();
        assert_eq!(trace_id(&md), "");
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id(&md), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
