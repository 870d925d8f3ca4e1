//! When to restart a pattern: exponential backoff with jitter, reset after a
//! healthy stretch, and a start-rate breaker (crash-loop protection).
//!
//! Written by hand rather than with `backon` (which the supervisor uses for
//! connection retries): a restart schedule must be *reset* after the pattern
//! has served for a while and must count starts in a sliding window, and
//! neither is something a retry iterator models. The clock is passed in so
//! the rules are tested without time passing.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RestartConfig;

#[derive(Debug)]
pub struct RestartSchedule {
    cfg: RestartConfig,
    /// Restarts since the last reset; the exponent of the next delay.
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

    /// The delay before the next restart, without jitter:
    /// `initial * multiplier^attempt`, capped at `max_backoff`.
    pub fn base_delay(&self) -> Duration {
        let factor = self.cfg.multiplier.powi(self.attempt.min(64) as i32);
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

    /// An operator's start: forget everything.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.starts.clear();
    }

    pub fn config(&self) -> &RestartConfig {
        &self.cfg
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
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
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
        s.served(Duration::from_secs(59));
        assert_eq!(s.base_delay(), Duration::from_millis(400));
        s.served(Duration::from_secs(60));
        assert_eq!(s.base_delay(), Duration::from_millis(100));
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
}
