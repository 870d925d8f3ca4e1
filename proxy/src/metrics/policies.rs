//! What the traffic policies did, per namespace (labels bounded as in
//! `calls`: configured namespaces, `_unknown` otherwise):
//!
//! - `trellis_policy_refusals_total{namespace, reason}`: calls refused by a
//!   policy before reaching the pattern — `RATE_LIMITED`,
//!   `CONCURRENCY_LIMIT`, `CIRCUIT_OPEN`, `PROXY_OVERLOADED`;
//! - `trellis_retries_total{namespace}`: retry attempts made;
//! - `trellis_retry_budget_exhausted_total{namespace}`: retries not made
//!   because the budget was spent;
//! - `trellis_circuit_state{namespace, state}`: 1 for the breaker's current
//!   state (`closed`, `open`, `half_open`), 0 for the others;
//! - `trellis_circuit_trips_total{namespace}`: times the breaker opened.
//!
//! None of these is on the path of an ordinary successful call.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::calls::UNKNOWN_NAMESPACE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    pub namespace: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Namespace {
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CircuitLabels {
    pub namespace: String,
    pub state: &'static str,
}

/// The breaker's states, as the `state` label spells them.
pub const CIRCUIT_STATES: [&str; 3] = ["closed", "open", "half_open"];

pub struct PolicyMetrics {
    namespaces: Vec<String>,
    refusals: Family<Refusal, Counter>,
    retries: Family<Namespace, Counter>,
    budget_exhausted: Family<Namespace, Counter>,
    circuit: Family<CircuitLabels, Gauge>,
    trips: Family<Namespace, Counter>,
}

impl PolicyMetrics {
    pub fn new(namespaces: &[String], registry: &mut Registry) -> Self {
        let m = PolicyMetrics {
            namespaces: namespaces.to_vec(),
            refusals: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            circuit: Family::default(),
            trips: Family::default(),
        };
        registry.register(
            "trellis_policy_refusals",
            "Data calls refused by a traffic policy before reaching the pattern, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "trellis_retries",
            "Retry attempts made by the retry policy",
            m.retries.clone(),
        );
        registry.register(
            "trellis_retry_budget_exhausted",
            "Retries not made because the namespace's retry budget was spent",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "trellis_circuit_state",
            "The circuit breaker's state: 1 for the current one",
            m.circuit.clone(),
        );
        registry.register(
            "trellis_circuit_trips",
            "Times the circuit breaker opened",
            m.trips.clone(),
        );
        for ns in namespaces {
            m.circuit_state(ns, "closed");
        }
        m
    }

    /// A configured namespace's own name, else `_unknown`.
    fn label(&self, namespace: &str) -> String {
        if self.namespaces.iter().any(|n| n == namespace) {
            namespace.to_string()
        } else {
            UNKNOWN_NAMESPACE.to_string()
        }
    }

    pub fn refused(&self, namespace: &str, reason: &'static str) {
        self.refusals
            .get_or_create(&Refusal {
                namespace: self.label(namespace),
                reason,
            })
            .inc();
    }

    pub fn retried(&self, namespace: &str) {
        self.retries
            .get_or_create(&Namespace {
                namespace: self.label(namespace),
            })
            .inc();
    }

    pub fn budget_exhausted(&self, namespace: &str) {
        self.budget_exhausted
            .get_or_create(&Namespace {
                namespace: self.label(namespace),
            })
            .inc();
    }

    /// Sets the breaker's current state (one of [`CIRCUIT_STATES`]).
    pub fn circuit_state(&self, namespace: &str, state: &'static str) {
        let namespace = self.label(namespace);
        for s in CIRCUIT_STATES {
            self.circuit
                .get_or_create(&CircuitLabels {
                    namespace: namespace.clone(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }

    pub fn tripped(&self, namespace: &str) {
        self.trips
            .get_or_create(&Namespace {
                namespace: self.label(namespace),
            })
            .inc();
    }
}
