//! Traffic policies: what the data plane does for a namespace when its
//! pattern is slow, failing or flooded — timeouts, retries with a budget,
//! a circuit breaker, a concurrency limit and a rate limit. Plain data
//! here (part of the configuration, validated with it); the layers that
//! apply them live in `dataplane/`.
//!
//! ```yaml
//! policies:
//!   default:                 # namespaces without `policy:` use this one
//!     timeout: 5s
//!     retries: { max_attempts: 2 }
//!   slow-reports:
//!     timeout: 30s
//!     method_timeouts: { List: 60s }
//!     concurrency: { max_in_flight: 16 }
//! namespaces:
//!   - { name: reports, pattern: pg, policy: slow-reports }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tonic::Code;
use trellis_proto::idempotency::{MAX_RETENTION, MIN_RETENTION};

/// The name of the policy a namespace without `policy:` gets (the
/// built-in defaults when the config defines none by that name).
pub const DEFAULT: &str = "default";

/// The most attempts a call may get, counting the first (gRPC's A6 cap).
pub const MAX_ATTEMPTS: u32 = 5;

/// The longest any policy duration may be (a timeout, a backoff, a
/// window): longer is a typo, and would overflow the clock's arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// The most retries per second a budget may allow regardless of traffic.
pub const MAX_MIN_PER_SECOND: u32 = 1_000_000;

/// The most calls that may wait for a concurrency slot.
pub const MAX_QUEUE: u32 = 100_000;

/// `d` is within (0, MAX_DURATION]; else what is allowed.
fn duration_problem(d: Duration) -> Option<String> {
    if d.is_zero() {
        Some("must be greater than zero, e.g. \"5s\"; allowed: up to 1h".into())
    } else if d > MAX_DURATION {
        Some(format!(
            "{} is out of range; allowed: above 0, up to 1h",
            humantime::format_duration(d)
        ))
    } else {
        None
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Upper bound on a call to the namespace (instead of the proxy's
    /// `request_timeout`); a client's shorter deadline wins.
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Bounds per method name (`Get`, `List`, `Publish`, …), over `timeout`.
    pub method_timeouts: BTreeMap<String, TimeoutValue>,
    pub retries: Retries,
    pub circuit_breaker: CircuitBreaker,
    pub concurrency: Concurrency,
    pub rate_limit: RateLimit,
    pub idempotency: Idempotency,
}

/// How long patterns keep a write's idempotency record (docs/idempotency.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Idempotency {
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for Idempotency {
    fn default() -> Self {
        Idempotency {
            retention: trellis_proto::idempotency::DEFAULT_RETENTION,
        }
    }
}

/// A duration written as in the rest of the config (`250ms`, `5s`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct TimeoutValue(#[serde(with = "humantime_serde")] pub Duration);

/// gRPC's retry semantics (proposal A6), bounded by a budget.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Retries {
    /// Attempts in all, counting the first: 1 (no retries) to 5.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// Each backoff is drawn from `[d·(1−jitter), d·(1+jitter)]`.
    pub jitter: f64,
    /// Status codes from the pattern (or from failing to reach it) that
    /// are retried, by name.
    pub retryable_codes: Vec<String>,
    /// Methods besides Get and List that are safe to retry without an
    /// idempotency key (`Put`, `Delete`, `Publish`).
    pub idempotent_methods: Vec<String>,
    pub budget: RetryBudget,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            multiplier: 2.0,
            jitter: 0.2,
            retryable_codes: vec!["UNAVAILABLE".into()],
            idempotent_methods: Vec::new(),
            budget: RetryBudget::default(),
        }
    }
}

/// Retries may add at most `ratio` of the calls made over `window`, plus
/// `min_per_second` (as Linkerd's and tower's `TpsBudget`): they can never
/// multiply an outage.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

/// Fails calls at once while the namespace's pattern keeps failing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreaker {
    pub enabled: bool,
    /// Opens after this many failures in a row…
    pub consecutive_failures: u32,
    /// …or when at least `min_calls` calls in `window` failed at this ratio.
    pub failure_ratio: f64,
    pub min_calls: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long it stays open before probing.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Probe calls let through half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            enabled: true,
            consecutive_failures: 5,
            failure_ratio: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            probes: 3,
        }
    }
}

/// In-flight calls to the namespace.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Concurrency {
    pub max_in_flight: u32,
    /// Calls that may wait for a slot (0: refuse at once).
    pub queue: u32,
    /// How long a queued call may wait.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            max_in_flight: 1000,
            queue: 0,
            queue_timeout: Duration::from_millis(100),
        }
    }
}

/// A token bucket for the namespace, or one per caller.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Calls per second; absent: no rate limit.
    pub per_second: Option<u32>,
    /// Calls allowed at once above the rate (default: `per_second`).
    pub burst: Option<u32>,
    /// One bucket per caller, identified by `caller_key` metadata, else
    /// the peer address.
    pub per_caller: bool,
    pub caller_key: Option<String>,
}

impl RateLimit {
    pub fn caller_key(&self) -> &str {
        self.caller_key.as_deref().unwrap_or("x-client-id")
    }
}

/// A namespace's policy, ready for the data plane.
#[derive(Debug)]
pub struct Resolved {
    /// The policy's name, for messages and metrics.
    pub name: String,
    pub policy: Policy,
    pub retryable: Vec<Code>,
}

impl Resolved {
    pub fn new(name: &str, policy: Policy) -> Arc<Self> {
        let retryable = policy
            .retries
            .retryable_codes
            .iter()
            .filter_map(|c| code_by_name(c))
            .collect();
        Arc::new(Resolved {
            name: name.to_string(),
            policy,
            retryable,
        })
    }

    /// The bound on a call to `method` (`Get`), or `None` for the proxy's
    /// `request_timeout`.
    pub fn timeout(&self, method: &str) -> Option<Duration> {
        self.policy
            .method_timeouts
            .get(method)
            .map(|t| t.0)
            .or(self.policy.timeout)
    }
}

/// The policy named `name` in `policies`, or the built-in defaults for
/// [`DEFAULT`].
pub fn resolve(policies: &BTreeMap<String, Policy>, name: Option<&str>) -> Arc<Resolved> {
    let name = name.unwrap_or(DEFAULT);
    Resolved::new(name, policies.get(name).cloned().unwrap_or_default())
}

/// The gRPC code named `name` (`UNAVAILABLE`).
pub fn code_by_name(name: &str) -> Option<Code> {
    (0..=16)
        .map(Code::from_i32)
        .find(|c| trellis_proto::code_name(*c) == name)
}

/// Every problem in `policies.<name>`, as (field, message).
pub fn validate(name: &str, p: &Policy, methods: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let at = |f: &str| format!("policies.{name}.{f}");
    let mut bad = |f: &str, m: String| out.push((at(f), m));
    if let Some(m) = p.timeout.and_then(duration_problem) {
        bad("timeout", m);
    }
    for (m, t) in &p.method_timeouts {
        if !methods.contains(&m.as_str()) {
            bad(
                &format!("method_timeouts.{m}"),
                format!(
                    "{m:?} is not a data method; allowed: {}",
                    methods.join(", ")
                ),
            );
        } else if let Some(problem) = duration_problem(t.0) {
            bad(&format!("method_timeouts.{m}"), problem);
        }
    }
    let r = &p.retries;
    if !(1..=MAX_ATTEMPTS).contains(&r.max_attempts) {
        bad(
            "retries.max_attempts",
            format!(
                "{} is out of range; allowed: 1 (no retries) to {MAX_ATTEMPTS}, counting the first attempt",
                r.max_attempts
            ),
        );
    }
    if let Some(m) = duration_problem(r.initial_backoff) {
        bad("retries.initial_backoff", m);
    }
    if let Some(m) = duration_problem(r.max_backoff) {
        bad("retries.max_backoff", m);
    } else if r.max_backoff < r.initial_backoff {
        bad(
            "retries.max_backoff",
            "must be at least retries.initial_backoff".into(),
        );
    }
    if !(1.0..=10.0).contains(&r.multiplier) {
        bad(
            "retries.multiplier",
            format!("{} is out of range; allowed: 1.0 to 10.0", r.multiplier),
        );
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        bad(
            "retries.jitter",
            format!("{} is out of range; allowed: 0.0 to 1.0", r.jitter),
        );
    }
    for (i, c) in r.retryable_codes.iter().enumerate() {
        let at = format!("retries.retryable_codes[{i}]");
        if c == "OK" {
            bad(&at, "OK is a success and cannot be retried".into());
        } else if code_by_name(c).is_none() {
            bad(
                &at,
                format!(
                    "{c:?} is not a gRPC status code name (written in capitals); allowed: e.g. \
                     UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, DEADLINE_EXCEEDED"
                ),
            );
        }
    }
    for (i, m) in r.idempotent_methods.iter().enumerate() {
        if !methods.contains(&m.as_str()) {
            bad(
                &format!("retries.idempotent_methods[{i}]"),
                format!(
                    "{m:?} is not a data method; allowed: {}",
                    methods.join(", ")
                ),
            );
        }
    }
    if !(0.0..=1.0).contains(&r.budget.ratio) {
        bad(
            "retries.budget.ratio",
            format!("{} is out of range; allowed: 0.0 to 1.0", r.budget.ratio),
        );
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&r.budget.window) {
        bad(
            "retries.budget.window",
            "is out of range; allowed: 1s to 60s".into(),
        );
    }
    if r.budget.min_per_second > MAX_MIN_PER_SECOND {
        bad(
            "retries.budget.min_per_second",
            format!(
                "{} is out of range; allowed: 0 to {MAX_MIN_PER_SECOND}",
                r.budget.min_per_second
            ),
        );
    }
    let b = &p.circuit_breaker;
    if b.consecutive_failures == 0 {
        bad(
            "circuit_breaker.consecutive_failures",
            "must be at least 1".into(),
        );
    }
    if !(0.0..=1.0).contains(&b.failure_ratio) || b.failure_ratio == 0.0 {
        bad(
            "circuit_breaker.failure_ratio",
            format!(
                "{} is out of range; allowed: above 0.0, up to 1.0",
                b.failure_ratio
            ),
        );
    }
    if b.min_calls == 0 {
        bad("circuit_breaker.min_calls", "must be at least 1".into());
    }
    if let Some(m) = duration_problem(b.window) {
        bad("circuit_breaker.window", m);
    }
    if let Some(m) = duration_problem(b.open_for) {
        bad("circuit_breaker.open_for", m);
    }
    if b.probes == 0 {
        bad("circuit_breaker.probes", "must be at least 1".into());
    }
    let c = &p.concurrency;
    if c.max_in_flight == 0 {
        bad(
            "concurrency.max_in_flight",
            "must be at least 1 (to stop a namespace, route it nowhere)".into(),
        );
    }
    if c.queue > MAX_QUEUE {
        bad(
            "concurrency.queue",
            format!("{} is out of range; allowed: 0 to {MAX_QUEUE}", c.queue),
        );
    }
    if c.queue > 0
        && let Some(m) = duration_problem(c.queue_timeout)
    {
        bad("concurrency.queue_timeout", format!("{m} (when queue > 0)"));
    }
    let retention = p.idempotency.retention;
    if !(MIN_RETENTION..=MAX_RETENTION).contains(&retention) {
        bad(
            "idempotency.retention",
            "is out of range; allowed: 1s to 30 days (default 24h)".into(),
        );
    }
    let l = &p.rate_limit;
    if l.per_second == Some(0) {
        bad(
            "rate_limit.per_second",
            "must be at least 1; leave it out for no rate limit".into(),
        );
    }
    if l.burst == Some(0) {
        bad("rate_limit.burst", "must be at least 1".into());
    }
    if l.burst.is_some() && l.per_second.is_none() {
        bad("rate_limit.burst", "needs rate_limit.per_second".into());
    }
    if l.per_second.is_none() && (l.per_caller || l.caller_key.is_some()) {
        let f = if l.per_caller {
            "rate_limit.per_caller"
        } else {
            "rate_limit.caller_key"
        };
        bad(f, "needs rate_limit.per_second".into());
    }
    if let Some(k) = &l.caller_key {
        let valid = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid || k.starts_with("grpc-") || k.ends_with("-bin") || k.starts_with(':') {
            bad(
                "rate_limit.caller_key",
                format!(
                    "{k:?} is not a usable metadata key; allowed: lowercase letters, digits, '-' \
                     and '_', not starting with grpc- nor ending in -bin (e.g. x-client-id)"
                ),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const METHODS: &[&str] = &["Get", "Put", "Delete", "List", "Publish", "Subscribe"];

    #[test]
    fn the_defaults_are_valid_and_safe() {
        let p = Policy::default();
        assert!(validate("default", &p, METHODS).is_empty());
        assert_eq!(p.retries.max_attempts, 2, "one retry at most");
        assert_eq!(p.rate_limit.per_second, None, "no rate limit unless asked");
        let r = Resolved::new("default", p);
        assert_eq!(r.retryable, vec![Code::Unavailable]);
        assert_eq!(r.timeout("Get"), None, "request_timeout applies");
    }

    #[test]
    fn every_field_out_of_range_is_named() {
        let mut p = Policy {
            timeout: Some(Duration::ZERO),
            ..Policy::default()
        };
        p.method_timeouts
            .insert("Nope".into(), TimeoutValue(Duration::from_secs(1)));
        p.retries.max_attempts = 6;
        p.retries.multiplier = 0.5;
        p.retries.jitter = 2.0;
        p.retries.retryable_codes = vec!["NOT_A_CODE".into()];
        p.retries.idempotent_methods = vec!["Drop".into()];
        p.retries.budget.ratio = 1.5;
        p.circuit_breaker.probes = 0;
        p.concurrency.max_in_flight = 0;
        p.rate_limit.per_second = Some(0);
        p.rate_limit.caller_key = Some("Bad Key".into());
        let fields: Vec<String> = validate("p", &p, METHODS)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        for want in [
            "policies.p.timeout",
            "policies.p.method_timeouts.Nope",
            "policies.p.retries.max_attempts",
            "policies.p.retries.multiplier",
            "policies.p.retries.jitter",
            "policies.p.retries.retryable_codes[0]",
            "policies.p.retries.idempotent_methods[0]",
            "policies.p.retries.budget.ratio",
            "policies.p.circuit_breaker.probes",
            "policies.p.concurrency.max_in_flight",
            "policies.p.rate_limit.per_second",
            "policies.p.rate_limit.caller_key",
        ] {
            assert!(
                fields.iter().any(|f| f == want),
                "{want} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn method_timeouts_win_over_the_policy_timeout() {
        let mut p = Policy {
            timeout: Some(Duration::from_secs(2)),
            ..Policy::default()
        };
        p.method_timeouts
            .insert("List".into(), TimeoutValue(Duration::from_secs(9)));
        let r = Resolved::new("p", p);
        assert_eq!(r.timeout("List"), Some(Duration::from_secs(9)));
        assert_eq!(r.timeout("Get"), Some(Duration::from_secs(2)));
    }
}
