//! Prometheus metrics: one registry for the proxy, rendered at `GET
//! /metrics` on the HTTP port. Built on `prometheus-client`, the Prometheus
//! project's own Rust client (OpenMetrics text, no global registry, custom
//! metric types through `EncodeMetric`).
//!
//! - `calls`: the data plane's per-call durations (server and client side).
//! - `histogram`: a lock-free histogram for the hot path.

pub mod calls;
pub mod histogram;

use prometheus_client::registry::Registry;

pub use calls::{CallKey, CallMetrics, Side};

/// `Content-Type` of the Prometheus text format.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub calls: CallMetrics,
}

impl Metrics {
    /// `namespaces`: (namespace, pattern) pairs from the config; `methods`:
    /// the data methods' full names.
    pub fn new(namespaces: &[(String, String)], methods: &[String]) -> Self {
        let mut registry = Registry::default();
        let calls = CallMetrics::new(namespaces, methods, &mut registry);
        Metrics { registry, calls }
    }

    /// The exposition, in OpenMetrics text when `openmetrics`, else in the
    /// Prometheus text format; with its content type.
    pub fn render(&self, openmetrics: bool) -> (&'static str, String) {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug
        // in a metric, and the scrape then shows what was written so far.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        if openmetrics {
            let _ = prometheus_client::encoding::text::encode_eof(&mut out);
            (OPENMETRICS, out)
        } else {
            (TEXT, out)
        }
    }
}
