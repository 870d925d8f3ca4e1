//! Per-call metrics of the data plane, named after the OpenTelemetry RPC
//! semantic conventions in Prometheus form:
//!
//! - `rpc_server_call_duration_seconds`: client → proxy, from the request's
//!   arrival to the end of its response, refusals included;
//! - `rpc_client_call_duration_seconds`: proxy → pattern, from sending the
//!   call to the end of the pattern's response;
//!
//! both labelled `rpc_method` (`trellis.data.v1.KeyValue/Get`),
//! `rpc_response_status_code` (`OK`, `UNAVAILABLE`, …), `namespace` and
//! `pattern`. Labels are bounded: namespaces and patterns come from the
//! config (a namespace nobody configured is counted as `_unknown`), methods
//! from the contract, codes are the 17 of gRPC. Never keys, values or ids.
//!
//! The hot path takes no lock: each (namespace, method, code) has a slot
//! holding its histograms once first used, found by index.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::Code;

use super::histogram::AtomicHistogram;
use crate::error::code_name;

/// The namespace label of a call to a namespace nobody configured: client
/// input never becomes a label value.
pub const UNKNOWN_NAMESPACE: &str = "_unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub rpc_method: String,
    pub rpc_response_status_code: String,
    pub namespace: String,
    pub pattern: String,
}

type Histograms = Family<CallLabels, AtomicHistogram, fn() -> AtomicHistogram>;

/// Which side of the proxy a duration was measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Client → proxy.
    Server,
    /// Proxy → pattern.
    Client,
}

/// Where a call's figures go: found once per call, used at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallKey {
    namespace: usize,
    method: usize,
}

pub struct CallMetrics {
    server: Histograms,
    client: Histograms,
    /// (namespace, its pattern); the last entry is `_unknown`.
    namespaces: Vec<(String, String)>,
    namespace_index: HashMap<String, usize>,
    methods: Vec<String>,
    method_index: HashMap<String, usize>,
    /// `[namespace][method][code]` → (server, client) histograms.
    slots: Vec<OnceLock<(AtomicHistogram, AtomicHistogram)>>,
}

const CODES: usize = 17;

impl CallMetrics {
    /// `namespaces`: (namespace, pattern) from the config; `methods`: the
    /// data methods' full names (`trellis.data.v1.KeyValue/Get`).
    pub fn new(
        namespaces: &[(String, String)],
        methods: &[String],
        registry: &mut Registry,
    ) -> Self {
        let server: Histograms = Family::new_with_constructor(AtomicHistogram::seconds);
        let client: Histograms = Family::new_with_constructor(AtomicHistogram::seconds);
        registry.register(
            "rpc_server_call_duration_seconds",
            "Duration of data calls as clients see them: arrival at the proxy to the end of the response",
            server.clone(),
        );
        registry.register(
            "rpc_client_call_duration_seconds",
            "Duration of the proxy -> pattern hop of data calls: sent to the pattern to the end of its response",
            client.clone(),
        );
        let mut namespaces = namespaces.to_vec();
        namespaces.push((UNKNOWN_NAMESPACE.to_string(), String::new()));
        let namespace_index = namespaces
            .iter()
            .enumerate()
            .map(|(i, (ns, _))| (ns.clone(), i))
            .collect();
        let method_index = methods
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), i))
            .collect();
        let slots = (0..namespaces.len() * methods.len() * CODES)
            .map(|_| OnceLock::new())
            .collect();
        CallMetrics {
            server,
            client,
            namespaces,
            namespace_index,
            methods: methods.to_vec(),
            method_index,
            slots,
        }
    }

    /// The key for a call to `namespace` (anything, as the client sent it)
    /// and `method` (a full name); `None` for a method that is not a data
    /// method.
    pub fn key(&self, namespace: &str, method: &str) -> Option<CallKey> {
        let method = *self.method_index.get(method)?;
        let namespace = self
            .namespace_index
            .get(namespace)
            .copied()
            .unwrap_or(self.namespaces.len() - 1);
        Some(CallKey { namespace, method })
    }

    /// Records one call's duration on one side.
    pub fn observe(&self, key: CallKey, side: Side, code: Code, elapsed: Duration) {
        let code_i = (code as usize).min(CODES - 1);
        let slot = (key.namespace * self.methods.len() + key.method) * CODES + code_i;
        let Some(cell) = self.slots.get(slot) else {
            return;
        };
        let (server, client) = cell.get_or_init(|| {
            let (namespace, pattern) = &self.namespaces[key.namespace];
            let labels = CallLabels {
                rpc_method: self.methods[key.method].clone(),
                rpc_response_status_code: code_name(code).to_string(),
                namespace: namespace.clone(),
                pattern: pattern.clone(),
            };
            (
                self.server.get_or_create(&labels).clone(),
                self.client.get_or_create(&labels).clone(),
            )
        });
        match side {
            Side::Server => server.observe(elapsed.as_secs_f64()),
            Side::Client => client.observe(elapsed.as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (CallMetrics, Registry) {
        let mut registry = Registry::default();
        let m = CallMetrics::new(
            &[("default".into(), "mem".into())],
            &["trellis.data.v1.KeyValue/Get".into()],
            &mut registry,
        );
        (m, registry)
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn a_call_is_counted_under_its_labels() {
        let (m, registry) = metrics();
        let key = m.key("default", "trellis.data.v1.KeyValue/Get").unwrap();
        m.observe(key, Side::Server, Code::Ok, Duration::from_micros(300));
        m.observe(key, Side::Server, Code::Ok, Duration::from_millis(3));
        m.observe(
            key,
            Side::Client,
            Code::Unavailable,
            Duration::from_millis(1),
        );
        let out = text(&registry);
        assert!(
            out.contains(r#"rpc_server_call_duration_seconds_count{rpc_method="trellis.data.v1.KeyValue/Get",rpc_response_status_code="OK",namespace="default",pattern="mem"} 2"#),
            "{out}"
        );
        assert!(
            out.contains(r#"rpc_client_call_duration_seconds_count{rpc_method="trellis.data.v1.KeyValue/Get",rpc_response_status_code="UNAVAILABLE",namespace="default",pattern="mem"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"le="0.0005""#),
            "sub-millisecond buckets: {out}"
        );
    }

    #[test]
    fn client_input_never_becomes_a_label() {
        let (m, registry) = metrics();
        let key = m
            .key(
                "a-namespace-nobody-configured",
                "trellis.data.v1.KeyValue/Get",
            )
            .unwrap();
        m.observe(key, Side::Server, Code::NotFound, Duration::from_micros(50));
        let out = text(&registry);
        assert!(!out.contains("nobody"), "{out}");
        assert!(out.contains(r#"namespace="_unknown",pattern="""#), "{out}");
        assert!(m.key("default", "/not/a/method").is_none());
    }
}
