//! `Balance`: which of a pattern's replicas one attempt goes to.
//!
//! Per request (L7), as the gRPC load-balancing guides recommend, not per
//! connection: **least request with the power of two choices** — two
//! replicas drawn at random among those that may take the call, the one
//! with fewer calls in flight wins (Envoy's `LEAST_REQUEST`, finagle's
//! P2C). It needs no shared queue and no lock, and a slow replica, whose
//! calls pile up, is picked less on its own. "In flight" is sent and not
//! yet answered: a unary call's whole life, a stream until it opens (an
//! open stream costs its pattern little, and ends when the pattern stops).
//!
//! May take the call: SERVING (a replica whose process exited is skipped
//! from the moment the supervisor notices, before any call fails on it),
//! implementing the called service, not ejected, and not already tried by
//! an earlier attempt of the same call (`Retry` goes to another replica).
//! When that leaves none, ejected replicas are used, then tried ones:
//! a call is never refused while some replica serves.
//!
//! **Outlier ejection** (Envoy's outlier detection): a replica whose calls
//! ended UNAVAILABLE `consecutive_failures` times in a row — the proxy
//! could not reach it, its stream broke, or it said so — is left out for
//! `base_ejection_time` × the times it was ejected (less one for each
//! `base_ejection_time` it stayed in since), at most `max_ejection_time`,
//! and never more than `max_ejection_percent` of the replicas at once. It
//! comes back when the time is up; a new process (a restart) starts with
//! a clean record. A pattern with one process is not balanced: the layer
//! passes its one upstream through.
//!
//! The counts live in each process handle's [`Load`]: atomics read on the
//! pick, and one short mutex at a call's end for the outlier record —
//! never held across an await.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::{Either, Ready, ready};
use http::Response;
use rand::Rng;
use smallvec::SmallVec;
use tokio::sync::Notify;
use tonic::Code;
use tower::{Layer, Service};
use tracing::warn;

use super::body::CallBody;
use super::outcome::{At, WhenDone};
use super::route::Router;
use super::{Call, errors};
use crate::config::OutlierDetection;
use crate::error::ApiError;
use crate::supervisor::{PatternHandle, State, Status};
use crate::upstream::Upstream;

/// Milliseconds since the first call of this process: what `Load`'s
/// atomics store instead of an `Instant`.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What the data plane puts on one process handle (a replica, or a
/// pattern's only process): calls in flight and made, and its outlier
/// record. Lives as long as the handle; `trellis_replica_*` metrics read it.
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicU32,
    /// Set while someone waits for `in_flight` to reach 0 ([`Load::idle`]):
    /// only then does the last call out wake them (no lock per call).
    draining: AtomicBool,
    idle: Notify,
    calls: AtomicU64,
    ejections_total: AtomicU64,
    /// While ejected: until when (`now_ms`); 0 otherwise.
    ejected_until: AtomicU64,
    /// The pid the ejection is about: a new process is never ejected.
    ejected_pid: AtomicU32,
    outlier: Mutex<Outlier>,
}

#[derive(Debug, Default)]
struct Outlier {
    /// The process the record is about.
    pid: u32,
    consecutive: u32,
    /// Times ejected (the period's multiplier).
    times: u32,
}

impl Load {
    /// Calls sent and not yet answered now (a stream until it opens).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Waits until no call is in flight, for at most `limit`: a process
    /// leaving the routes answers what was already sent to it before it
    /// is told to stop (a call picked just before the switch may still be
    /// on its way to it). Open streams do not count: the pattern's own
    /// drain ends them. Returns whether it got there.
    pub async fn idle(&self, limit: Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        let wait = async {
            loop {
                let woken = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                woken.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Attempts sent to it since it started.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Times it was ejected.
    pub fn ejections(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    /// Whether process `pid` is ejected now.
    pub fn ejected(&self, pid: Option<u32>) -> bool {
        self.ejected_at(now_ms(), pid)
    }

    fn ejected_at(&self, now: u64, pid: Option<u32>) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
            && pid == Some(self.ejected_pid.load(Ordering::Relaxed))
    }

    /// Records how an attempt on process `pid` ended. `Some(period)`
    /// when this ends its run of failures with an ejection, which `allowed`
    /// (the pool's cap) may forbid.
    fn record(
        &self,
        pid: u32,
        failed: bool,
        o: &OutlierDetection,
        allowed: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let mut r = self.outlier.lock().unwrap_or_else(PoisonError::into_inner);
        if r.pid != pid {
            *r = Outlier {
                pid,
                ..Outlier::default()
            };
        }
        if !failed {
            r.consecutive = 0;
            return None;
        }
        r.consecutive += 1;
        let now = now_ms();
        if r.consecutive < o.consecutive_failures || self.ejected_at(now, Some(pid)) || !allowed() {
            return None;
        }
        // Less one for each base period it stayed in since it came back
        // (when its last ejection ended).
        let base = o.base_ejection_time.as_millis().max(1) as u64;
        let back_at = self.ejected_until.load(Ordering::Relaxed);
        let stayed = now.saturating_sub(back_at) / base;
        r.times = (r.times.saturating_sub(stayed.min(u32::MAX as u64) as u32)) + 1;
        let period = o
            .base_ejection_time
            .saturating_mul(r.times)
            .min(o.max_ejection_time);
        let until = now + period.as_millis() as u64;
        r.consecutive = 0;
        self.ejected_pid.store(pid, Ordering::Relaxed);
        self.ejected_until.store(until, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        Some(period)
    }
}

/// One call in flight on a process, counted until it is dropped.
struct InFlight(Arc<Load>);

impl InFlight {
    fn new(load: Arc<Load>) -> Self {
        load.in_flight.fetch_add(1, Ordering::SeqCst);
        load.calls.fetch_add(1, Ordering::Relaxed);
        InFlight(load)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.draining.load(Ordering::SeqCst)
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// The data connection of a process that can take a call to `service`
/// now: SERVING, connected, implementing it.
fn usable<'s>(s: &'s Status, service: &str) -> Option<&'s Upstream> {
    match (s.state, &s.upstream) {
        (State::Serving, Some(u)) if u.implements(service) => Some(u),
        _ => None,
    }
}

/// The processes serving one namespace: a pattern's replicas (or its only
/// process), with its outlier detection settings.
#[derive(Debug)]
pub struct Pool {
    pattern: Arc<str>,
    members: Vec<PatternHandle>,
    outlier: OutlierDetection,
}

impl Pool {
    pub fn new(pattern: &str, members: Vec<PatternHandle>, outlier: OutlierDetection) -> Self {
        Pool {
            pattern: pattern.into(),
            members,
            outlier,
        }
    }

    /// The configured pattern's name.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    pub fn members(&self) -> &[PatternHandle] {
        &self.members
    }

    /// Whether some member can take a call to `service` now; else the
    /// error a caller gets (UNIMPLEMENTED, or UNAVAILABLE with each
    /// member's state).
    pub fn check(&self, namespace: &str, service: &str) -> Result<(), ApiError> {
        let mut missing = None;
        for m in &self.members {
            let found = m.with_status(|s| match (s.state, &s.upstream) {
                (State::Serving, Some(u)) if u.implements(service) => Ok(()),
                (State::Serving, Some(u)) => {
                    Err(Some(errors::not_implemented(namespace, service, u)))
                }
                _ => Err(None),
            });
            match found {
                Ok(()) => return Ok(()),
                Err(Some(e)) => missing = Some(e),
                Err(None) => {}
            }
        }
        Err(missing.unwrap_or_else(|| self.not_serving(namespace)))
    }

    fn not_serving(&self, namespace: &str) -> ApiError {
        match self.members.as_slice() {
            [one] => one.with_status(|s| {
                errors::not_serving(namespace, one.name(), s.state, s.last_error.as_deref())
            }),
            all => {
                let states: Vec<String> = all
                    .iter()
                    .map(|m| format!("{} {}", m.name(), m.with_status(|s| s.state)))
                    .collect();
                errors::no_replica_serving(namespace, &self.pattern, &states)
            }
        }
    }

    /// The member for one attempt and its process's pid, by P2C least
    /// request among those that may take it (see the module's doc).
    fn pick(&self, service: &str, tried: u32) -> Option<(usize, Upstream, u32)> {
        if let [one] = self.members.as_slice() {
            return one
                .with_status(|s| usable(s, service).map(|u| (0, u.clone(), s.pid.unwrap_or(0))));
        }
        let now = now_ms();
        // (member, upstream, pid, rank: 0 best … 2 tried)
        let mut serving: SmallVec<[(usize, Upstream, u32, u8); 8]> = SmallVec::new();
        for (i, m) in self.members.iter().enumerate() {
            m.with_status(|s| {
                if let Some(u) = usable(s, service) {
                    let rank = if i < 32 && tried & (1 << i) != 0 {
                        2
                    } else if m.load().ejected_at(now, s.pid) {
                        1
                    } else {
                        0
                    };
                    serving.push((i, u.clone(), s.pid.unwrap_or(0), rank));
                }
            });
        }
        let best = serving.iter().map(|c| c.3).min()?;
        serving.retain(|c| c.3 == best);
        let n = serving.len();
        let choice = if n == 1 {
            0
        } else {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let load = |k: usize| self.members[serving[k].0].load().in_flight();
            if load(b) < load(a) { b } else { a }
        };
        let (i, u, pid, _) = serving.swap_remove(choice);
        Some((i, u, pid))
    }

    /// How many members are ejected now.
    fn ejected_now(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.with_status(|s| m.load().ejected(s.pid)))
            .count()
    }

    /// Records an attempt's end on member `i` (process `pid`): its outlier
    /// record, and an ejection if it is due and the cap allows.
    fn record(&self, i: usize, pid: u32, code: Code) {
        let Some(m) = self.members.get(i) else { return };
        if self.members.len() < 2 {
            return;
        }
        let failed = code == Code::Unavailable;
        let cap = self.members.len() * self.outlier.max_ejection_percent as usize / 100;
        let ejected = m
            .load()
            .record(pid, failed, &self.outlier, || self.ejected_now() < cap);
        if let Some(period) = ejected {
            warn!(
                pattern = %self.pattern,
                replica = m.name(),
                pid,
                failures = self.outlier.consecutive_failures,
                period = %humantime::format_duration(period),
                "replica ejected: its last calls all ended UNAVAILABLE; it takes no calls until \
                 the period ends"
            );
        }
    }
}

/// Picks from the routes as they are at the attempt, not as `Route` saw
/// them: once a reroute took a process out, no attempt goes to it, so
/// waiting for its calls in flight to end ([`Load::idle`]) is enough
/// before it is told to stop.
pub struct BalanceLayer {
    router: Router,
}

impl BalanceLayer {
    pub fn new(router: Router) -> Self {
        BalanceLayer { router }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            router: self.router.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
    router: Router,
}

impl<S> Service<Call> for Balance<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<Ready<Result<Response<CallBody>, ApiError>>, WhenDone<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        // The routes now; Route's pool if a reload removed the namespace
        // since (the call finishes where it was routed).
        let Some(pool) = self
            .router
            .pool(&call.namespace)
            .or_else(|| call.pool.clone())
        else {
            // Route always sets the pool; without one there is nothing to pick.
            return Either::Left(ready(Err(errors::unknown_namespace(&call.namespace, &[]))));
        };
        let tried = call.tried.as_ref().map_or(0, |t| t.load(Ordering::Relaxed));
        let Some((i, upstream, pid)) = pool.pick(call.method.service, tried) else {
            // Every member stopped serving since Route looked: retryable.
            let e = pool
                .check(&call.namespace, call.method.service)
                .err()
                .unwrap_or_else(|| pool.not_serving(&call.namespace));
            return Either::Left(ready(Err(e)));
        };
        if let Some(t) = &call.tried
            && i < 32
        {
            t.fetch_or(1 << i, Ordering::Relaxed);
        }
        call.upstream = Some(upstream);
        let in_flight = InFlight::new(Arc::clone(pool.members[i].load()));
        let hook = Box::new(move |code: Code| {
            drop(in_flight);
            pool.record(i, pid, code);
        });
        // In flight until answered: a unary call's whole life, a stream's
        // until it opens. An open stream holds no pick: the pattern ends it
        // when it stops, so it need not delay a retiring process either.
        Either::Right(WhenDone::new(self.inner.call(call), hook).at(At::Headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn k_failures_in_a_row_eject_and_a_success_resets_the_run() {
        let load = Load::default();
        let o = detection();
        assert_eq!(load.record(7, true, &o, || true), None);
        assert_eq!(load.record(7, true, &o, || true), None);
        assert_eq!(load.record(7, false, &o, || true), None, "an OK resets");
        assert_eq!(load.record(7, true, &o, || true), None);
        assert_eq!(load.record(7, true, &o, || true), None);
        assert_eq!(
            load.record(7, true, &o, || true),
            Some(Duration::from_secs(10))
        );
        assert!(load.ejected(Some(7)));
        assert!(!load.ejected(Some(8)), "a new process is never ejected");
        assert_eq!(load.ejections(), 1);
    }

    #[tokio::test]
    async fn idle_waits_for_the_calls_in_flight_and_no_longer_than_its_limit() {
        let load = Arc::new(Load::default());
        assert!(load.idle(Duration::ZERO).await, "nothing in flight");
        let call = InFlight::new(load.clone());
        assert!(
            !load.idle(Duration::from_millis(1)).await,
            "a call in flight outlasts the limit"
        );
        let waiting = tokio::spawn({
            let load = load.clone();
            async move { load.idle(Duration::from_secs(60)).await }
        });
        // The waiter may or may not be parked yet: either way it sees 0.
        drop(call);
        assert!(waiting.await.unwrap(), "woken when the last call ended");
        assert_eq!(load.in_flight(), 0);
        assert_eq!(load.calls(), 1);
    }

    #[test]
    fn the_cap_forbids_an_ejection() {
        let load = Load::default();
        let o = detection();
        for _ in 0..10 {
            assert_eq!(load.record(7, true, &o, || false), None);
        }
        assert!(!load.ejected(Some(7)));
    }

    #[test]
    fn a_new_process_starts_with_a_clean_record() {
        let load = Load::default();
        let o = detection();
        load.record(7, true, &o, || true);
        load.record(7, true, &o, || true);
        // The process was replaced: its predecessor's failures do not count.
        assert_eq!(load.record(8, true, &o, || true), None);
        assert_eq!(load.record(8, true, &o, || true), None);
        assert_eq!(
            load.record(8, true, &o, || true),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn ejections_grow_up_to_the_maximum() {
        let load = Load::default();
        let o = detection();
        let mut periods = Vec::new();
        for _ in 0..3 {
            // Back at once (as if the period had passed without a call).
            load.ejected_until.store(now_ms(), Ordering::Relaxed);
            for _ in 0..3 {
                if let Some(p) = load.record(7, true, &o, || true) {
                    periods.push(p);
                }
            }
        }
        assert_eq!(
            periods,
            [10, 20, 25].map(Duration::from_secs),
            "base × times ejected, at most max_ejection_time"
        );
    }
}
