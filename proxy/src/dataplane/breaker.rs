//! The circuit breaker, one circuit per namespace. It sees each call's
//! final outcome (after `Retry`, below it), so one failed call counts once
//! however many attempts it took.
//!
//! ```text
//!   closed ── N failures in a row, or ≥ min_calls in the window failing
//!     ▲        at failure_ratio or more ──▶ open
//!     │                                      │ open_for passes
//!     └── every probe succeeded ── half_open ◀┘
//!                    one probe failed ──▶ open again
//! ```
//!
//! Failures are UNAVAILABLE, DEADLINE_EXCEEDED and INTERNAL — the pattern's
//! own statuses and the proxy's failures to reach it alike. Every other
//! status is a success (NOT_FOUND is the pattern working), except
//! CANCELLED, and DEADLINE_EXCEEDED of a call whose client chose a deadline
//! shorter than the policy's: a client that went away, or asked for less
//! time than the pattern is allowed, says nothing about the pattern (else
//! one client sending 10 ms deadlines to a slow method would open the
//! circuit for every caller).
//! While open, calls fail at once with UNAVAILABLE `CIRCUIT_OPEN` and a
//! `RetryInfo` of the time left; half-open, `probes` calls go through and
//! the rest are refused the same way.
//!
//! The state sits behind a `std::sync::Mutex` held only to read or update
//! it — never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use http::Response;
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, Service};

use super::body::CallBody;
use super::limits::{Refused, refuse};
use super::outcome::WhenDone;
use super::{Call, Policies, Telemetry, errors};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::policy::CircuitBreaker;

/// What a half-open circuit tells the calls beyond its probes to wait.
const PROBING_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { admitted: u32, passed: u32 },
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open { .. } => "open",
            Phase::HalfOpen { .. } => "half_open",
        }
    }
}

struct State {
    phase: Phase,
    consecutive: u32,
    window_start: Instant,
    calls: u32,
    failures: u32,
    trips: u64,
}

/// One namespace's circuit.
pub struct Circuit {
    namespace: String,
    policy: String,
    config: CircuitBreaker,
    state: Mutex<State>,
    metrics: Option<Arc<Metrics>>,
}

/// A circuit's state, for the admin API.
#[derive(Clone, Debug, PartialEq)]
pub struct CircuitView {
    pub namespace: String,
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Times the circuit opened since the proxy started.
    pub trips: u64,
    /// Failures in a row so far (closed).
    pub consecutive_failures: u32,
    /// While open: how long until it lets probes through.
    pub opens_in: Option<Duration>,
}

/// A call let through, and whether it is one of the half-open probes.
struct Ticket {
    circuit: Arc<Circuit>,
    probe: bool,
    recorded: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            // A probe that never ended (its caller went away): its place
            // goes to the next call.
            self.circuit.release_probe();
        }
    }
}

fn is_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Internal
    )
}

impl Circuit {
    fn new(
        namespace: &str,
        policy: &str,
        config: CircuitBreaker,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Circuit {
            namespace: namespace.to_string(),
            policy: policy.to_string(),
            config,
            state: Mutex::new(State {
                phase: Phase::Closed,
                consecutive: 0,
                window_start: Instant::now(),
                calls: 0,
                failures: 0,
                trips: 0,
            }),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_phase(&self, state: &mut State, phase: Phase) {
        if phase.name() != state.phase.name()
            && let Some(m) = &self.metrics
        {
            m.policies.circuit_state(&self.namespace, phase.name());
        }
        state.phase = phase;
    }

    /// Lets a call through, or says how long to wait.
    fn admit(self: &Arc<Self>) -> Result<Ticket, Duration> {
        let now = Instant::now();
        let mut s = self.lock();
        let probe = match s.phase {
            Phase::Closed => false,
            Phase::Open { until } if now < until => return Err(until - now),
            Phase::Open { .. } => {
                self.set_phase(
                    &mut s,
                    Phase::HalfOpen {
                        admitted: 1,
                        passed: 0,
                    },
                );
                true
            }
            Phase::HalfOpen { admitted, passed } if admitted < self.config.probes => {
                s.phase = Phase::HalfOpen {
                    admitted: admitted + 1,
                    passed,
                };
                true
            }
            Phase::HalfOpen { .. } => return Err(PROBING_RETRY),
        };
        Ok(Ticket {
            circuit: self.clone(),
            probe,
            recorded: false,
        })
    }

    fn release_probe(&self) {
        let mut s = self.lock();
        if let Phase::HalfOpen { admitted, passed } = s.phase {
            s.phase = Phase::HalfOpen {
                admitted: admitted.saturating_sub(1),
                passed,
            };
        }
    }

    fn record(&self, ticket: &mut Ticket, code: Code, client_deadline: bool) {
        ticket.recorded = true;
        if code == Code::Cancelled || (code == Code::DeadlineExceeded && client_deadline) {
            if ticket.probe {
                self.release_probe();
            }
            return;
        }
        let failed = is_failure(code);
        let now = Instant::now();
        let mut s = self.lock();
        match s.phase {
            Phase::Closed => {
                if now.duration_since(s.window_start) >= self.config.window {
                    s.window_start = now;
                    s.calls = 0;
                    s.failures = 0;
                }
                s.calls += 1;
                if failed {
                    s.failures += 1;
                    s.consecutive += 1;
                } else {
                    s.consecutive = 0;
                }
                let ratio_tripped = s.calls >= self.config.min_calls
                    && f64::from(s.failures) >= self.config.failure_ratio * f64::from(s.calls);
                if s.consecutive >= self.config.consecutive_failures || ratio_tripped {
                    self.open(&mut s, now);
                }
            }
            Phase::HalfOpen { admitted, passed } if ticket.probe => {
                if failed {
                    self.open(&mut s, now);
                } else if passed + 1 >= self.config.probes {
                    s.consecutive = 0;
                    s.calls = 0;
                    s.failures = 0;
                    s.window_start = now;
                    self.set_phase(&mut s, Phase::Closed);
                    tracing::info!(namespace = %self.namespace, "circuit closed: the probes succeeded");
                } else {
                    s.phase = Phase::HalfOpen {
                        admitted,
                        passed: passed + 1,
                    };
                }
            }
            // A call let through before the circuit opened, or beside the
            // probes: the probes decide.
            _ => {}
        }
    }

    fn open(&self, s: &mut State, now: Instant) {
        s.trips += 1;
        tracing::warn!(
            namespace = %self.namespace,
            policy = %self.policy,
            consecutive_failures = s.consecutive,
            failures = s.failures,
            calls = s.calls,
            open_for = ?self.config.open_for,
            "circuit opened: calls to the namespace fail at once until probes succeed"
        );
        self.set_phase(
            s,
            Phase::Open {
                until: now + self.config.open_for,
            },
        );
        if let Some(m) = &self.metrics {
            m.policies.tripped(&self.namespace);
        }
    }

    fn view(&self) -> CircuitView {
        let s = self.lock();
        CircuitView {
            namespace: self.namespace.clone(),
            state: s.phase.name(),
            trips: s.trips,
            consecutive_failures: s.consecutive,
            opens_in: match s.phase {
                Phase::Open { until } => Some(until.saturating_duration_since(Instant::now())),
                _ => None,
            },
        }
    }
}

/// Every namespace's circuit (for the layer and the admin API).
pub struct Circuits {
    by_namespace: HashMap<String, Arc<Circuit>>,
}

impl Circuits {
    pub fn new(policies: &Policies, telemetry: &Telemetry) -> Self {
        let metrics = telemetry.metrics_arc();
        Circuits {
            by_namespace: policies
                .namespaces()
                .filter(|(_, p)| p.policy.circuit_breaker.enabled)
                .map(|(ns, p)| {
                    let c = Circuit::new(
                        ns,
                        &p.name,
                        p.policy.circuit_breaker.clone(),
                        metrics.clone(),
                    );
                    (ns.to_string(), Arc::new(c))
                })
                .collect(),
        }
    }

    /// The circuits of `namespaces` (those with a breaker), in that order.
    pub fn views<'a>(&self, namespaces: impl IntoIterator<Item = &'a str>) -> Vec<CircuitView> {
        namespaces
            .into_iter()
            .filter_map(|ns| self.by_namespace.get(ns))
            .map(|c| c.view())
            .collect()
    }
}

pub struct BreakerLayer {
    circuits: Arc<Circuits>,
    telemetry: Arc<Telemetry>,
}

impl BreakerLayer {
    pub fn new(circuits: Arc<Circuits>, telemetry: Arc<Telemetry>) -> Self {
        BreakerLayer {
            circuits,
            telemetry,
        }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            circuits: self.circuits.clone(),
            telemetry: self.telemetry.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Breaker<S> {
    inner: S,
    circuits: Arc<Circuits>,
    telemetry: Arc<Telemetry>,
}

impl<S> Service<Call> for Breaker<S>
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
        let Some(circuit) = self.circuits.by_namespace.get(&*call.namespace) else {
            return Either::Left(WhenDone::passing(self.inner.call(call)));
        };
        match circuit.admit() {
            Ok(mut ticket) => {
                let circuit = circuit.clone();
                let client_deadline = call.client_deadline;
                let hook = Box::new(move |code| circuit.record(&mut ticket, code, client_deadline));
                Either::Left(WhenDone::new(self.inner.call(call), hook))
            }
            Err(wait) => {
                // Whole milliseconds, at least one: a RetryInfo of 0 says "now".
                let wait = Duration::from_millis((wait.as_millis() as u64).max(1));
                let pattern = call.pool.as_ref().map_or("?", |p| p.pattern());
                let e = errors::circuit_open(&call.namespace, pattern, &circuit.policy, wait);
                Either::Right(refuse(&self.telemetry, &call.namespace, e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(consecutive: u32, probes: u32) -> Arc<Circuit> {
        let config = CircuitBreaker {
            consecutive_failures: consecutive,
            probes,
            open_for: Duration::from_millis(50),
            ..CircuitBreaker::default()
        };
        Arc::new(Circuit::new("ns", "p", config, None))
    }

    fn call(c: &Arc<Circuit>, code: Code) -> Result<(), Duration> {
        let mut t = c.admit()?;
        c.record(&mut t, code, false);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_after_the_probes() {
        let c = circuit(3, 2);
        call(&c, Code::Unavailable).unwrap();
        call(&c, Code::NotFound).unwrap(); // a success: the run restarts
        for _ in 0..3 {
            call(&c, Code::Unavailable).unwrap();
        }
        assert_eq!(c.view().state, "open");
        assert!(call(&c, Code::Ok).is_err(), "open: refused");
        tokio::time::advance(Duration::from_millis(51)).await;
        let mut first = c.admit().expect("the first probe");
        let mut second = c.admit().expect("the second probe");
        assert!(c.admit().is_err(), "only two probes at a time");
        c.record(&mut first, Code::Ok, false);
        assert_eq!(c.view().state, "half_open");
        c.record(&mut second, Code::Ok, false);
        assert_eq!(c.view().state, "closed");
        assert_eq!(c.view().trips, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_and_a_dropped_one_frees_its_place() {
        let c = circuit(1, 1);
        call(&c, Code::Internal).unwrap();
        tokio::time::advance(Duration::from_millis(51)).await;
        drop(c.admit().expect("a probe"));
        let mut probe = c.admit().expect("the dropped probe's place");
        c.record(&mut probe, Code::DeadlineExceeded, false);
        assert_eq!(c.view().state, "open");
        assert_eq!(c.view().trips, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_calls_and_client_deadlines_count_for_nothing_and_ratio_trips_over_a_window()
    {
        let config = CircuitBreaker {
            consecutive_failures: 100,
            failure_ratio: 0.5,
            min_calls: 4,
            ..CircuitBreaker::default()
        };
        let c = Arc::new(Circuit::new("ns", "p", config, None));
        for _ in 0..10 {
            call(&c, Code::Cancelled).unwrap();
            let mut t = c.admit().unwrap();
            c.record(&mut t, Code::DeadlineExceeded, true); // the client's own short deadline
        }
        call(&c, Code::Ok).unwrap();
        call(&c, Code::Unavailable).unwrap();
        call(&c, Code::Ok).unwrap();
        assert_eq!(c.view().state, "closed", "3 calls: under min_calls");
        call(&c, Code::Unavailable).unwrap();
        assert_eq!(c.view().state, "open", "2 of 4 failed");
    }
}
