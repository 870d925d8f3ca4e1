//! What the proxy's shutdown waits share: each wait (the drain delay, the
//! doors' `shutdown_grace`) is bounded, and a second SIGTERM/SIGINT cuts
//! every remaining one short, as an operator pressing Ctrl-C twice
//! expects.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// A bounded wait that a second signal ends at once.
#[derive(Clone, Debug)]
pub struct Grace {
    limit: Duration,
    hurry: watch::Receiver<bool>,
}

impl Grace {
    /// `hurry` turns true on the second signal.
    pub fn new(limit: Duration, hurry: watch::Receiver<bool>) -> Self {
        Grace { limit, hurry }
    }

    /// A grace that only its limit ends (for tests).
    pub fn fixed(limit: Duration) -> Self {
        let (_, hurry) = watch::channel(false);
        Grace { limit, hurry }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Runs `work` until it completes (`true`), or until the limit or a
    /// second signal ends the wait (`false`).
    pub async fn bound(&self, work: impl Future) -> bool {
        let mut hurry = self.hurry.clone();
        let hurried = async move {
            // No sender left: nobody can hurry this wait.
            if hurry.wait_for(|h| *h).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            done = tokio::time::timeout(self.limit, work) => done.is_ok(),
            _ = hurried => false,
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
        let (tx, rx) = watch::channel(false);
        let grace = Grace::new(Duration::from_secs(15), rx);
        let start = tokio::time::Instant::now();
        let wait = grace.bound(std::future::pending::<()>());
        tokio::pin!(wait);
        assert!(futures::poll!(wait.as_mut()).is_pending());
        tx.send(true).unwrap();
        assert!(!wait.await);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
