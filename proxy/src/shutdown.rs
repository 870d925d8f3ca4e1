//! The proxy's shutdown signals and waits. A signal is a
//! [`CancellationToken`] (tokio-util): cancelled once, seen by every clone
//! — `closing` when the doors start to close (the data plane refuses new
//! calls and ends streams, the admin API ends its watches, the reload task
//! stops waiting for a replacement, each door closes), `hurry` on a second
//! signal. Each wait (the drain delay, the doors' `shutdown_grace`) is a
//! [`Grace`]: bounded, and cut short by `hurry`, as an operator pressing
//! Ctrl-C twice expects.

use std::future::Future;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;

/// A bounded wait that a second signal ends at once.
#[derive(Clone, Debug)]
pub struct Grace {
    limit: Duration,
    hurry: CancellationToken,
}

impl Grace {
    /// `hurry` is cancelled on the second signal.
    pub fn new(limit: Duration, hurry: CancellationToken) -> Self {
        Grace { limit, hurry }
    }

    /// A grace that only its limit ends (for tests).
    pub fn fixed(limit: Duration) -> Self {
        Grace {
            limit,
            hurry: CancellationToken::new(),
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Runs `work` until it completes (`true`), or until the limit or a
    /// second signal ends the wait (`false`).
    pub async fn bound(&self, work: impl Future) -> bool {
        tokio::select! {
            done = tokio::time::timeout(self.limit, work) => done.is_ok(),
            _ = self.hurry.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_that_ends_in_time_completes() {
        let grace = Grace::fixed(Duration::from_secs(5));
        assert!(
            grace
                .bound(tokio::time::sleep(Duration::from_secs(1)))
                .await
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_ends_the_wait() {
        let grace = Grace::fixed(Duration::from_secs(5));
        let start = tokio::time::Instant::now();
        assert!(!grace.bound(std::future::pending::<()>()).await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_ends_the_wait_at_once() {
        let hurry = CancellationToken::new();
        let grace = Grace::new(Duration::from_secs(15), hurry.clone());
        let start = tokio::time::Instant::now();
        let wait = grace.bound(std::future::pending::<()>());
        tokio::pin!(wait);
        assert!(futures::poll!(wait.as_mut()).is_pending());
        hurry.cancel();
        assert!(!wait.await);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
