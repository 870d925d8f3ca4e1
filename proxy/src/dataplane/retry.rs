//! Retries with gRPC's semantics (grpc/proposal A6), inside the call's one
//! deadline and a retry budget per namespace.
//!
//! A call is retried only when all of these hold:
//! - it is safe to repeat: Get, List and Subscribe always; Put, Delete and
//!   Publish only with an `idempotency-key` or when the policy lists the
//!   method in `retries.idempotent_methods`;
//! - the attempt failed before the pattern committed to an answer — the
//!   proxy could not reach it, or it answered trailers-only (no message,
//!   no response headers of its own) — with a code in `retryable_codes`;
//! - attempts are left (`max_attempts`, counting the first);
//! - the pattern did not push back with a negative or unreadable
//!   `grpc-retry-pushback-ms` (a valid one, or a `RetryInfo` in its status,
//!   replaces the backoff — for a pattern with replicas, it only shortens
//!   it: the retry goes to another replica than the one that pushed back);
//! - the backoff ends before the call's deadline;
//! - the namespace's budget (tower's `TpsBudget`: `ratio` of the calls made
//!   over `window`, plus `min_per_second`) has a retry to spend.
//!
//! Otherwise the last attempt's answer is the call's answer. Retries carry
//! `grpc-previous-rpc-attempts`. Backoff: `initial_backoff`, times
//! `multiplier` after each retry, capped by `max_backoff`, each drawn from
//! `[d·(1−jitter), d·(1+jitter)]`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use rand::Rng;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceExt};

use super::body::CallBody;
use super::{Call, Policies, Telemetry};
use crate::error::ApiError;
use crate::policy::Retries;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<CallBody>, ApiError>> + Send>>;

const PREVIOUS_ATTEMPTS: HeaderName = HeaderName::from_static("grpc-previous-rpc-attempts");
const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Methods that are always safe to repeat.
const SAFE: [&str; 3] = ["Get", "List", "Subscribe"];

pub struct RetryLayer {
    budgets: Arc<HashMap<String, TpsBudget>>,
    telemetry: Arc<Telemetry>,
}

impl RetryLayer {
    pub fn new(policies: &Policies, telemetry: Arc<Telemetry>) -> Self {
        let budgets = policies
            .namespaces()
            .filter(|(_, p)| p.policy.retries.max_attempts > 1)
            .map(|(ns, p)| {
                let b = &p.policy.retries.budget;
                // Validated with the config to what TpsBudget accepts.
                let budget = TpsBudget::new(b.window, b.min_per_second, b.ratio as f32);
                (ns.to_string(), budget)
            })
            .collect();
        RetryLayer {
            budgets: Arc::new(budgets),
            telemetry,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            budgets: self.budgets.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    budgets: Arc<HashMap<String, TpsBudget>>,
    telemetry: Arc<Telemetry>,
}

/// Whether repeating the call cannot do twice what the caller asked once.
fn safe_to_repeat(call: &Call, retries: &Retries) -> bool {
    let name = call.method.name.as_str();
    SAFE.contains(&name)
        || call.headers.contains_key(trellis_proto::idempotency::KEY)
        || retries.idempotent_methods.iter().any(|m| m == name)
}

impl<S> Service<Call> for Retry<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(budget) = self.budgets.get(&*call.namespace) else {
            return Either::Left(self.inner.call(call));
        };
        // Every call earns the budget its share, retried or not.
        budget.deposit();
        if !safe_to_repeat(&call, &call.policy.policy.retries) {
            return Either::Left(self.inner.call(call));
        }
        let inner = self.inner.clone();
        let budgets = self.budgets.clone();
        let telemetry = self.telemetry.clone();
        Either::Right(Box::pin(retrying(inner, call, budgets, telemetry)))
    }
}

/// What the pattern said about retrying.
#[derive(Debug, PartialEq)]
enum Pushback {
    /// Nothing: the policy's backoff applies.
    None,
    /// Retry after exactly this long.
    After(Duration),
    /// Do not retry.
    Stop,
}

/// The pattern's pushback, from a trailers-only answer's headers.
fn pushback(headers: &HeaderMap) -> Pushback {
    if let Some(v) = headers.get(PUSHBACK) {
        return match v.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok()) {
            Some(ms) if ms >= 0 => Pushback::After(Duration::from_millis(ms as u64)),
            _ => Pushback::Stop,
        };
    }
    if headers.contains_key("grpc-status-details-bin")
        && let Some(status) = tonic::Status::from_header_map(headers)
        && let Some(delay) = status.get_details_retry_info().and_then(|r| r.retry_delay)
    {
        return Pushback::After(delay);
    }
    Pushback::None
}

fn jittered(d: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return d;
    }
    let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
    d.mul_f64(factor.max(0.0))
}

async fn retrying<S>(
    mut inner: S,
    call: Call,
    budgets: Arc<HashMap<String, TpsBudget>>,
    telemetry: Arc<Telemetry>,
) -> Result<Response<CallBody>, ApiError>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    let mut call = call;
    let replicated = call.pool.as_ref().is_some_and(|p| p.members().len() > 1);
    if replicated {
        // Each attempt goes to a replica the earlier ones did not (Balance).
        call.tried = Some(Arc::default());
    }
    let policy = call.policy.clone();
    let r = &policy.policy.retries;
    let mut backoff = r.initial_backoff;
    let mut attempt = 1;
    loop {
        let mut this = call.again();
        if attempt > 1 {
            this.headers
                .insert(PREVIOUS_ATTEMPTS, HeaderValue::from(attempt - 1));
        }
        let result = inner.ready().await?.call(this).await;
        let (code, pushback) = match &result {
            // The proxy's own failures to reach the pattern; their retry
            // hint is for clients, not a pushback.
            Err(e) => (e.code, Pushback::None),
            Ok(response) => match response.body().trailers_only() {
                Some(code) if code != Code::Ok => (code, pushback(response.headers())),
                // Answered: committed, whatever its trailers say.
                _ => return result,
            },
        };
        if attempt >= r.max_attempts || !policy.retryable.contains(&code) {
            return result;
        }
        let delay = match pushback {
            Pushback::Stop => return result,
            // A replica's pushback is about that replica, and the retry
            // goes to another: no longer than the policy's backoff.
            Pushback::After(d) if replicated => d.min(jittered(backoff, r.jitter)),
            Pushback::After(d) => d,
            Pushback::None => jittered(backoff, r.jitter),
        };
        if Instant::now() + delay >= call.deadline {
            return result;
        }
        let metrics = telemetry.metrics();
        let spent = budgets
            .get(&*call.namespace)
            .is_some_and(|budget| budget.withdraw());
        if !spent {
            if let Some(m) = metrics {
                m.policies.budget_exhausted(&call.namespace);
            }
            return result;
        }
        if let Some(m) = metrics {
            m.policies.retried(&call.namespace);
        }
        drop(result);
        tokio::time::sleep(delay).await;
        backoff = backoff.mul_f64(r.multiplier).min(r.max_backoff);
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn pushback_follows_a6() {
        assert_eq!(pushback(&headers(&[])), Pushback::None);
        assert_eq!(
            pushback(&headers(&[(PUSHBACK, "250")])),
            Pushback::After(Duration::from_millis(250))
        );
        assert_eq!(pushback(&headers(&[(PUSHBACK, "-1")])), Pushback::Stop);
        assert_eq!(pushback(&headers(&[(PUSHBACK, "soon")])), Pushback::Stop);
    }

    #[test]
    fn a_retry_info_in_the_status_is_a_pushback() {
        let e = ApiError::new(Code::Unavailable, "BUSY", "busy")
            .retry_after(Duration::from_millis(700));
        let mut h = HeaderMap::new();
        e.to_status().add_header(&mut h).unwrap();
        assert_eq!(pushback(&h), Pushback::After(Duration::from_millis(700)));
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let d = Duration::from_millis(100);
        for _ in 0..1000 {
            let j = jittered(d, 0.2);
            assert!(
                j >= Duration::from_millis(80) && j <= Duration::from_millis(120),
                "{j:?}"
            );
        }
        assert_eq!(jittered(d, 0.0), d);
    }
}
