//! Limits, each refusing at once with a stable reason and a `RetryInfo`:
//!
//! - `Shed`: the whole proxy's calls in flight (`max_in_flight`), outside
//!   `Route`: when the proxy itself is saturated it refuses early
//!   (UNAVAILABLE `PROXY_OVERLOADED`) instead of queueing without bound;
//! - `RateLimit`: a token bucket per namespace, or per caller
//!   (RESOURCE_EXHAUSTED `RATE_LIMITED`), with `governor`'s GCRA;
//! - `Concurrency`: calls in flight per namespace
//!   (RESOURCE_EXHAUSTED `CONCURRENCY_LIMIT`), with an optional bounded
//!   queue whose wait never outlasts the call's deadline.
//!
//! A unary call holds its place until its response ends; a `Subscribe`
//! stream only until it opens (an open subscription waits on the pattern's
//! messages, not on its capacity, and must not starve unary calls).
//! Admin and health calls never come here: they are not on the data path.

use std::collections::HashMap;
use std::future::{Future, Ready, ready};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use http::{HeaderName, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use super::body::CallBody;
use super::outcome::{At, WhenDone};
use super::{Call, Policies, Telemetry, errors};
use crate::error::ApiError;
use crate::policy::Resolved;

pub(super) type Refused = Ready<Result<Response<CallBody>, ApiError>>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<CallBody>, ApiError>> + Send>>;

/// When a call gives its place back: at its end, or as its stream opens.
fn release_at(call: &Call) -> At {
    if call.method.server_streaming {
        At::Headers
    } else {
        At::End
    }
}

pub(super) fn refuse(telemetry: &Telemetry, namespace: &str, e: ApiError) -> Refused {
    if let Some(m) = telemetry.metrics() {
        m.policies.refused(namespace, reason_label(&e.reason));
    }
    ready(Err(e))
}

/// The refusal reasons as `'static` metric labels.
fn reason_label(reason: &str) -> &'static str {
    match reason {
        "PROXY_OVERLOADED" => "PROXY_OVERLOADED",
        "RATE_LIMITED" => "RATE_LIMITED",
        "CONCURRENCY_LIMIT" => "CONCURRENCY_LIMIT",
        "CIRCUIT_OPEN" => "CIRCUIT_OPEN",
        _ => "OTHER",
    }
}

// ---------------------------------------------------------------- Shed

pub struct ShedLayer {
    telemetry: Arc<Telemetry>,
    max: u32,
    in_flight: Arc<AtomicU32>,
}

impl ShedLayer {
    /// `max`: the proxy-wide bound (`max_in_flight` in the config).
    pub fn new(telemetry: Arc<Telemetry>, max: u32) -> Self {
        ShedLayer {
            telemetry,
            max,
            in_flight: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            telemetry: self.telemetry.clone(),
            max: self.max,
            in_flight: self.in_flight.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
    max: u32,
    in_flight: Arc<AtomicU32>,
}

/// One place in a count, given back when dropped.
struct Place(Arc<AtomicU32>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> Service<Call> for Shed<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<WhenDone<S::Future>, Refused>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let place = Place(self.in_flight.clone());
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max {
            drop(place);
            let e = errors::overloaded(&call.namespace, self.max);
            return Either::Right(refuse(&self.telemetry, &call.namespace, e));
        }
        let at = release_at(&call);
        let done = WhenDone::new(self.inner.call(call), Box::new(move |_| drop(place)));
        Either::Left(done.at(at))
    }
}

// ---------------------------------------------------------------- RateLimit

/// How many checks between sweeps of a per-caller limiter's idle buckets:
/// callers are external input, so their buckets must not pile up.
const SWEEP_EVERY: u64 = 4096;

/// The longest caller identity kept as a bucket key (longer ones are cut).
const MAX_CALLER_LEN: usize = 128;

enum Bucket {
    Namespace(DefaultDirectRateLimiter),
    PerCaller {
        limiter: DefaultKeyedRateLimiter<String>,
        key: HeaderName,
        checks: AtomicU64,
    },
}

struct RateLimiter {
    bucket: Bucket,
    per_second: u32,
    policy: String,
}

impl RateLimiter {
    fn new(p: &Resolved) -> Option<Self> {
        let l = &p.policy.rate_limit;
        let per_second = NonZeroU32::new(l.per_second?)?;
        let burst = l.burst.and_then(NonZeroU32::new).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        let bucket = if l.per_caller {
            Bucket::PerCaller {
                limiter: governor::RateLimiter::keyed(quota),
                // Validated with the config; the fallback is the default.
                key: HeaderName::from_bytes(l.caller_key().as_bytes())
                    .unwrap_or(HeaderName::from_static("x-client-id")),
                checks: AtomicU64::new(0),
            }
        } else {
            Bucket::Namespace(governor::RateLimiter::direct(quota))
        };
        Some(RateLimiter {
            bucket,
            per_second: per_second.get(),
            policy: p.name.clone(),
        })
    }

    /// `Ok` if the call may go, else the refusal.
    fn check(&self, call: &Call) -> Result<(), ApiError> {
        let (result, caller) = match &self.bucket {
            Bucket::Namespace(l) => (l.check(), None),
            Bucket::PerCaller {
                limiter,
                key,
                checks,
            } => {
                let caller = caller_of(call, key);
                let result = limiter.check_key(&caller);
                if checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
                (result, Some(caller))
            }
        };
        result.map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            // Whole milliseconds, at least one: a RetryInfo of 0 says "now".
            let wait = Duration::from_millis((wait.as_millis() as u64).max(1));
            errors::rate_limited(
                &call.namespace,
                &self.policy,
                self.per_second,
                caller.as_deref(),
                wait,
            )
        })
    }
}

/// Who is calling: the identity `Authorize` established (with `access:`
/// configured, every call that gets here has one), else the `key`
/// metadata's value, else the peer's IP address (one client may open
/// several connections), else `unknown`.
fn caller_of(call: &Call, key: &HeaderName) -> String {
    if let Some(identity) = &call.identity {
        return identity.to_string();
    }
    if let Some(v) = call.headers.get(key) {
        let s = String::from_utf8_lossy(v.as_bytes());
        let mut end = s.len().min(MAX_CALLER_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        return s[..end].to_string();
    }
    match call.peer {
        Some(addr) => addr.ip().to_string(),
        None => "unknown".to_string(),
    }
}

pub struct RateLimitLayer {
    telemetry: Arc<Telemetry>,
    limiters: Arc<HashMap<String, RateLimiter>>,
}

impl RateLimitLayer {
    pub fn new(policies: &Policies, telemetry: Arc<Telemetry>) -> Self {
        let limiters = policies
            .namespaces()
            .filter_map(|(ns, p)| Some((ns.to_string(), RateLimiter::new(p)?)))
            .collect();
        RateLimitLayer {
            telemetry,
            limiters: Arc::new(limiters),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            telemetry: self.telemetry.clone(),
            limiters: self.limiters.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
    limiters: Arc<HashMap<String, RateLimiter>>,
}

impl<S> Service<Call> for RateLimit<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<S::Future, Refused>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        if let Some(limiter) = self.limiters.get(&*call.namespace)
            && let Err(e) = limiter.check(&call)
        {
            return Either::Right(refuse(&self.telemetry, &call.namespace, e));
        }
        Either::Left(self.inner.call(call))
    }
}

// ---------------------------------------------------------------- Concurrency

struct Slots {
    semaphore: Arc<Semaphore>,
    max: u32,
    /// Calls that may wait for a slot, and how long.
    queue: u32,
    queue_timeout: Duration,
    waiting: Arc<AtomicU32>,
    policy: String,
}

pub struct ConcurrencyLayer {
    telemetry: Arc<Telemetry>,
    slots: Arc<HashMap<String, Slots>>,
}

impl ConcurrencyLayer {
    pub fn new(policies: &Policies, telemetry: Arc<Telemetry>) -> Self {
        let slots = policies
            .namespaces()
            .map(|(ns, p)| {
                let c = &p.policy.concurrency;
                let slots = Slots {
                    semaphore: Arc::new(Semaphore::new(c.max_in_flight as usize)),
                    max: c.max_in_flight,
                    queue: c.queue,
                    queue_timeout: c.queue_timeout,
                    waiting: Arc::new(AtomicU32::new(0)),
                    policy: p.name.clone(),
                };
                (ns.to_string(), slots)
            })
            .collect();
        ConcurrencyLayer {
            telemetry,
            slots: Arc::new(slots),
        }
    }
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;
    fn layer(&self, inner: S) -> Concurrency<S> {
        Concurrency {
            inner,
            telemetry: self.telemetry.clone(),
            slots: self.slots.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Concurrency<S> {
    inner: S,
    telemetry: Arc<Telemetry>,
    slots: Arc<HashMap<String, Slots>>,
}

impl<S> Service<Call> for Concurrency<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<WhenDone<S::Future>, Either<Refused, BoxFuture>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(slots) = self.slots.get(&*call.namespace) else {
            // Only configured namespaces get past `Route`.
            return Either::Left(WhenDone::passing(self.inner.call(call)));
        };
        let at = release_at(&call);
        if let Ok(permit) = slots.semaphore.clone().try_acquire_owned() {
            let done = WhenDone::new(self.inner.call(call), Box::new(move |_| drop(permit)));
            return Either::Left(done.at(at));
        }
        let refused =
            || errors::concurrency_limited(&call.namespace, &slots.policy, slots.max, false);
        if slots.queue == 0 {
            let e = refused();
            return Either::Right(Either::Left(refuse(&self.telemetry, &call.namespace, e)));
        }
        let waiter = Place(slots.waiting.clone());
        if slots.waiting.fetch_add(1, Ordering::AcqRel) >= slots.queue {
            drop(waiter);
            let e = refused();
            return Either::Right(Either::Left(refuse(&self.telemetry, &call.namespace, e)));
        }
        // Queued: wait for a slot, at most `queue_timeout` and never past
        // the call's deadline.
        let until = call
            .deadline
            .min(tokio::time::Instant::now() + slots.queue_timeout);
        let semaphore = slots.semaphore.clone();
        let e = errors::concurrency_limited(&call.namespace, &slots.policy, slots.max, true);
        let telemetry = self.telemetry.clone();
        let mut inner = self.inner.clone();
        Either::Right(Either::Right(Box::pin(async move {
            let permit: Option<OwnedSemaphorePermit> =
                match tokio::time::timeout_at(until, semaphore.acquire_owned()).await {
                    Ok(Ok(permit)) => Some(permit),
                    _ => None,
                };
            drop(waiter);
            let Some(permit) = permit else {
                return refuse(&telemetry, &call.namespace, e).await;
            };
            let inner = tower::ServiceExt::ready(&mut inner).await?;
            WhenDone::new(inner.call(call), Box::new(move |_| drop(permit)))
                .at(at)
                .await
        })))
    }
}
