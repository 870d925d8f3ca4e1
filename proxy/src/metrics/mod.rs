//! Prometheus metrics: one registry for the proxy, rendered at `GET
//! /metrics` on the HTTP port. Built on `prometheus-client`, the Prometheus
//! project's own Rust client (OpenMetrics text, no global registry, custom
//! metric types through `EncodeMetric`).
//!
//! - `calls`: the data plane's per-call durations (server and client side).
//! - `histogram`: a lock-free histogram for the hot path.
//! - `patterns`: supervision (state, restarts by reason, start duration,
//!   memory) per pattern.
//! - `process`: the proxy's own `process_*` metrics.
//! - `policies`: what the traffic policies did (refusals, retries, the
//!   circuit breaker).
//! - `from_patterns`: each pattern's own metrics (`Lifecycle/Metrics`),
//!   fetched at scrape time and merged in with a `pattern` label.
//! - [`HttpLabels`]: the HTTP gateway's request durations (recorded by
//!   `gateway::metrics`, which knows the routes).
//!
//! Every metric is listed in docs/observability.md.

pub mod calls;
pub mod from_patterns;
pub mod histogram;
pub mod patterns;
pub mod policies;
pub mod process;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use calls::{CallKey, CallMetrics, Side};
use histogram::AtomicHistogram;
pub use patterns::PatternMetrics;

use std::sync::Arc;

use tokio::sync::watch;

use crate::supervisor::Roster;

/// `Content-Type` of the Prometheus text format.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of `http_server_request_duration_seconds`, after the
/// OpenTelemetry HTTP semantic conventions; all bounded (see
/// `gateway::metrics`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// `GET`, `PUT`, …; any non-standard method is `_OTHER`.
    pub http_request_method: &'static str,
    /// The matched route's path template
    /// (`/v1/namespaces/{namespace}/keys/{key}`), or `_unmatched`.
    pub http_route: String,
    pub http_response_status_code: u16,
}

pub type HttpHistograms = Family<HttpLabels, AtomicHistogram, fn() -> AtomicHistogram>;

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub calls: CallMetrics,
    /// The HTTP gateway's requests; the gateway records them.
    pub http: HttpHistograms,
    pub patterns: PatternMetrics,
    pub policies: policies::PolicyMetrics,
    /// The patterns' own metrics, fetched at scrape time.
    pub from_patterns: from_patterns::FromPatterns,
}

impl Metrics {
    /// `namespaces`: (namespace, pattern) pairs from the config; `methods`:
    /// the data methods' full names; `patterns`: the supervisor's handles.
    /// With patterns, call it inside the tokio runtime (see
    /// [`PatternMetrics::new`]).
    pub fn new(
        namespaces: &[(String, String)],
        methods: &[String],
        patterns: Option<watch::Receiver<Arc<Roster>>>,
    ) -> Self {
        let mut registry = Registry::default();
        let calls = CallMetrics::new(namespaces, methods, &mut registry);
        let http: HttpHistograms = Family::new_with_constructor(AtomicHistogram::seconds);
        registry.register(
            "http_server_request_duration_seconds",
            "Duration of HTTP gateway requests: arrival to the end of the response body",
            http.clone(),
        );
        let roster = patterns
            .clone()
            .unwrap_or_else(|| watch::channel(Arc::new(Roster::default())).1);
        let from_patterns = from_patterns::FromPatterns::new(roster, &mut registry);
        let patterns = match patterns {
            Some(roster) => PatternMetrics::new(roster, &mut registry),
            None => PatternMetrics::none(&mut registry),
        };
        let configured: Vec<String> = namespaces.iter().map(|(ns, _)| ns.clone()).collect();
        let policies = policies::PolicyMetrics::new(&configured, &mut registry);
        registry.register_collector(Box::new(process::ProcessCollector));
        Metrics {
            registry,
            calls,
            http,
            patterns,
            policies,
            from_patterns,
        }
    }

    /// The exposition, in OpenMetrics text when `openmetrics`, else in the
    /// Prometheus text format (0.0.4: a counter's `# TYPE` names its
    /// `_total` series, no `# UNIT`, no `# EOF`); with its content type.
    pub fn render(&self, openmetrics: bool) -> (&'static str, String) {
        use prometheus_client::encoding::{prometheus_text, text};
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in a metric, and the scrape then shows what was written so far.
        if openmetrics {
            let _ = text::encode(&mut out, &self.registry);
            (OPENMETRICS, out)
        } else {
            let _ = prometheus_text::encode(&mut out, &self.registry);
            (TEXT, out)
        }
    }
}

/// Whether an `Accept` header asks for OpenMetrics: one of its media
/// ranges is `application/openmetrics-text` with a non-zero `q`
/// (Prometheus sends `application/openmetrics-text;version=1.0.0,…;q=0.5`).
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let essence = parts.next().unwrap_or("");
        essence.eq_ignore_ascii_case("application/openmetrics-text")
            && parts.all(|p| {
                let Some((k, v)) = p.split_once('=') else {
                    return true;
                };
                !k.trim().eq_ignore_ascii_case("q")
                    || v.trim().parse::<f64>().is_ok_and(|q| q > 0.0)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("Application/OpenMetrics-Text"));
        assert!(!wants_openmetrics("application/openmetrics-text; q=0"));
        assert!(!wants_openmetrics("text/plain"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
    }

    #[test]
    fn both_formats_render_every_family() {
        let m = Metrics::new(
            &[("default".into(), "mem".into())],
            &["trellis.data.v1.KeyValue/Get".into()],
            None,
        );
        let key = m
            .calls
            .key("default", "trellis.data.v1.KeyValue/Get")
            .unwrap();
        m.calls.observe(
            key,
            Side::Server,
            tonic::Code::Ok,
            std::time::Duration::from_millis(2),
        );
        let (ct, text) = m.render(false);
        assert_eq!(ct, TEXT);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        assert!(
            text.contains(r#"rpc_server_call_duration_seconds_bucket{rpc_method="trellis.data.v1.KeyValue/Get",rpc_response_status_code="OK",namespace="default",pattern="mem",le="+Inf"} 1"#),
            "the overflow bucket is +Inf: {text}"
        );
        assert!(!text.contains("e308") && !text.contains("e+308"), "{text}");
        let (ct, om) = m.render(true);
        assert_eq!(ct, OPENMETRICS);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE process_cpu_seconds counter"), "{om}");
        assert!(
            om.lines().any(
                |l| l.starts_with("rpc_server_call_duration_seconds_bucket{")
                    && l.contains(r#"le="+Inf""#)
                    && l.contains(r#"rpc_response_status_code="OK""#)
                    && l.ends_with("} 1")
            ),
            "{om}"
        );
        assert!(!om.contains("e308") && !om.contains("e+308"), "{om}");
    }
}
