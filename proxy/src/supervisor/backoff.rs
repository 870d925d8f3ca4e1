//! When to restart a pattern: at once after a healthy stretch, then
//! exponential backoff with jitter for repeated crashes within
//! `restart.reset_after` (as runit restarts at once and throttles only fast
//! exits), and a start-rate breaker (crash-loop protection).
//!
//! Written by hand rather than with `backon` (which the supervisor uses for
//! connection retries): a restart schedule must be *reset* after the pattern
//! has served for a while and must count starts in a sliding window, and
//! neither is something a retry iterator models. The clock is passed in so
//! the rules are tested without time passing.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::process::Exit;
use super::state::RestartReason;
use crate::config::{RestartConfig, RestartPolicy};

#[derive(Debug)]
pub struct RestartSchedule {
    cfg: RestartConfig,
    /// Restarts since the last reset. The first is immediate; after that
    /// `attempt - 1` is the exponent of the delay.
    attempt: u32,
    /// Start times inside the breaker's window.
    starts: VecDeque<Instant>,
}

impl RestartSchedule {
    pub fn new(cfg: RestartConfig) -> Self {
        RestartSchedule {
            cfg,
            attempt: 0,
            starts: VecDeque::new(),
        }
    }

    /// The delay before the next restart, without jitter: zero for the
    /// first restart since a reset (a healthy stretch or an operator's
    /// action), then `initial * multiplier^(restarts - 1)`, capped at
    /// `max_backoff`.
    pub fn base_delay(&self) -> Duration {
        if self.attempt == 0 {
            return Duration::ZERO;
        }
        let factor = self.cfg.multiplier.powi((self.attempt - 1).min(64) as i32);
        let secs = self.cfg.initial_backoff.as_secs_f64() * factor;
        Duration::from_secs_f64(secs.min(self.cfg.max_backoff.as_secs_f64()))
    }

    /// The delay before the next restart, with "equal jitter": uniformly
    /// random in [base/2, base], so many patterns crashing together do not
    /// restart in lockstep. Advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base_delay();
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Records a start at `now`. Returns `false` when this start would be
    /// more than `max_starts` within `start_window`: the breaker trips and
    /// the start must not happen.
    pub fn allow_start(&mut self, now: Instant) -> bool {
        while let Some(&first) = self.starts.front() {
            if now.duration_since(first) >= self.cfg.start_window {
                self.starts.pop_front();
            } else {
                break;
            }
        }
        if self.starts.len() >= self.cfg.max_starts as usize {
            return false;
        }
        self.starts.push_back(now);
        true
    }

    /// Called when the pattern has been serving for `served`: a long enough
    /// healthy stretch forgets earlier crashes.
    pub fn served(&mut self, served: Duration) {
        if served >= self.cfg.reset_after {
            self.attempt = 0;
        }
    }

    /// An operator's start or restart: forget earlier crashes and starts
    /// (operator actions are not crashes and do not count toward
    /// `max_starts`).
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.starts.clear();
    }

    pub fn config(&self) -> &RestartConfig {
        &self.cfg
    }
}

/// How a process's life ended, as far as restarting is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Ending<'a> {
    /// It became ready, then exited on its own.
    Exited(Exit),
    /// The supervisor killed it (hung, over its memory limit).
    Killed {
        reason: &'a str,
        because: RestartReason,
    },
    /// It never became ready; `retry` is `None` when a restart cannot fix
    /// it (a missing binary, a rejected configuration, a taken fixed port).
    StartFailed {
        reason: &'a str,
        retry: Option<RestartReason>,
    },
}

/// What the supervisor does after a process's life ended (before the
/// breaker and the backoff, which [`RestartSchedule`] decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again, counted with `why`; `failure` says what happened.
    Restart { why: RestartReason, failure: String },
    /// It ended cleanly and its policy does not restart that: STOPPED.
    Stopped,
    /// It failed and stays down (policy, or nothing a restart can fix):
    /// FAILED with this reason.
    Failed(String),
}

/// The restart rule of docs/configuration.md as a pure function:
/// `always` restarts every ending, `on-failure` all but a clean exit
/// (code 0), `never` none; a failure that restarting cannot fix is FAILED
/// whatever the policy.
pub fn decide(policy: RestartPolicy, ending: Ending<'_>) -> Decision {
    match ending {
        Ending::Exited(exit) => {
            let restart = match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => exit.is_failure(),
                RestartPolicy::Never => false,
            };
            match (restart, exit.is_failure()) {
                (true, _) => Decision::Restart {
                    why: RestartReason::of_exit(exit),
                    failure: format!("exited with {exit}"),
                },
                (false, true) => {
                    Decision::Failed(format!("exited with {exit}; restart policy is {policy:?}"))
                }
                (false, false) => Decision::Stopped,
            }
        }
        Ending::Killed { reason, .. } if policy == RestartPolicy::Never => {
            Decision::Failed(format!("{reason}; restart policy is Never"))
        }
        Ending::Killed { reason, because } => Decision::Restart {
            why: because,
            failure: reason.to_string(),
        },
        Ending::StartFailed { reason, retry } => match retry {
            Some(why) if policy != RestartPolicy::Never => Decision::Restart {
                why,
                failure: reason.to_string(),
            },
            _ => Decision::Failed(reason.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RestartConfig {
        RestartConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            reset_after: Duration::from_secs(60),
            max_starts: 3,
            start_window: Duration::from_secs(10),
            ..RestartConfig::default()
        }
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut s = RestartSchedule::new(cfg());
        let mut bases = Vec::new();
        for _ in 0..12 {
            bases.push(s.base_delay().as_millis());
            s.next_delay();
        }
        assert_eq!(
            bases,
            [
                0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000
            ]
        );
    }

    #[test]
    fn jitter_stays_between_half_and_full_delay() {
        let mut s = RestartSchedule::new(cfg());
        for _ in 0..5 {
            let base = s.base_delay();
            let d = s.next_delay();
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
    }

    #[test]
    fn a_long_healthy_stretch_resets_the_delay() {
        let mut s = RestartSchedule::new(cfg());
        s.next_delay();
        s.next_delay();
        s.next_delay();
        s.served(Duration::from_secs(59));
        assert_eq!(s.base_delay(), Duration::from_millis(400));
        s.served(Duration::from_secs(60));
        assert_eq!(s.base_delay(), Duration::ZERO);
    }

    /// The schedule as the owner drives it, on tokio's paused clock: a crash
    /// after a healthy stretch restarts at once, fast crashes back off and
    /// grow, and a healthy stretch (or an operator) resets it.
    #[tokio::test(start_paused = true)]
    async fn first_restart_after_a_healthy_stretch_is_immediate_then_fast_crashes_back_off() {
        /// Serves for `d` of paused time, crashes, and returns the delay.
        async fn serve(s: &mut RestartSchedule, d: Duration) -> Duration {
            let t = Instant::now();
            tokio::time::advance(d).await;
            s.served(t.elapsed());
            s.next_delay()
        }
        let mut s = RestartSchedule::new(cfg());
        // The first crash of a pattern is restarted without delay.
        assert_eq!(serve(&mut s, Duration::from_secs(5)).await, Duration::ZERO);
        // Repeated fast crashes (within reset_after) back off and grow.
        let mut last = Duration::ZERO;
        for base_ms in [100u64, 200, 400, 800] {
            let d = serve(&mut s, Duration::from_millis(10)).await;
            let base = Duration::from_millis(base_ms);
            assert!(d >= base / 2 && d <= base, "{d:?} for base {base:?}");
            assert!(d >= last / 2, "delays grow: {d:?} after {last:?}");
            last = d;
        }
        // Serving for reset_after forgets them: immediate again.
        assert_eq!(serve(&mut s, Duration::from_secs(60)).await, Duration::ZERO);
        assert!(serve(&mut s, Duration::from_millis(10)).await >= Duration::from_millis(50));
        // An operator's action resets too.
        s.reset();
        assert_eq!(
            serve(&mut s, Duration::from_millis(10)).await,
            Duration::ZERO
        );
    }

    #[test]
    fn breaker_trips_after_max_starts_in_the_window_and_recovers_after_it() {
        let mut s = RestartSchedule::new(cfg());
        let t0 = Instant::now();
        assert!(s.allow_start(t0));
        assert!(s.allow_start(t0 + Duration::from_secs(1)));
        assert!(s.allow_start(t0 + Duration::from_secs(2)));
        assert!(
            !s.allow_start(t0 + Duration::from_secs(3)),
            "4th start in 10s"
        );
        // Once the first start leaves the window, one more is allowed.
        assert!(s.allow_start(t0 + Duration::from_secs(10)));
        s.reset();
        assert!(s.allow_start(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn the_restart_rule_for_every_policy_and_ending() {
        use super::{Decision, Ending, RestartPolicy as P, RestartReason as R, decide};
        use crate::supervisor::process::Exit;
        let clean = Ending::Exited(Exit::Code(0));
        let failed = Ending::Exited(Exit::Code(3));
        let crashed = Ending::Exited(Exit::Signal(11));
        let hung = Ending::Killed {
            reason: "no health answer",
            because: R::Unhealthy,
        };
        let retryable = Ending::StartFailed {
            reason: "bad handshake",
            retry: Some(R::Exit),
        };
        let unfixable = Ending::StartFailed {
            reason: "missing binary",
            retry: None,
        };
        let restart = |why, failure: &str| Decision::Restart {
            why,
            failure: failure.to_string(),
        };
        // always: everything but what a restart cannot fix.
        assert_eq!(
            decide(P::Always, clean),
            restart(R::Exit, "exited with exit code 0")
        );
        assert_eq!(
            decide(P::Always, failed),
            restart(R::Exit, "exited with exit code 3")
        );
        assert_eq!(
            decide(P::Always, crashed),
            restart(R::Signal, "exited with signal 11 (SIGSEGV)")
        );
        assert_eq!(
            decide(P::Always, hung),
            restart(R::Unhealthy, "no health answer")
        );
        assert_eq!(
            decide(P::Always, retryable),
            restart(R::Exit, "bad handshake")
        );
        assert_eq!(
            decide(P::Always, unfixable),
            Decision::Failed("missing binary".into())
        );
        // on-failure: a clean exit stays stopped.
        assert_eq!(decide(P::OnFailure, clean), Decision::Stopped);
        assert_eq!(
            decide(P::OnFailure, failed),
            restart(R::Exit, "exited with exit code 3")
        );
        assert_eq!(
            decide(P::OnFailure, hung),
            restart(R::Unhealthy, "no health answer")
        );
        assert_eq!(
            decide(P::OnFailure, unfixable),
            Decision::Failed("missing binary".into())
        );
        // never: nothing restarts; a failure is FAILED, a clean exit STOPPED.
        assert_eq!(decide(P::Never, clean), Decision::Stopped);
        assert!(matches!(decide(P::Never, failed), Decision::Failed(r) if r.contains("Never")));
        assert!(matches!(decide(P::Never, hung), Decision::Failed(r) if r.contains("Never")));
        assert_eq!(
            decide(P::Never, retryable),
            Decision::Failed("bad handshake".into())
        );
    }
}
