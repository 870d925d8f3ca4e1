//! The request to shut down: made once (by `Lifecycle/Stop`, a signal, or the
//! caller's shutdown future), seen by every task that has to react.

use std::time::Duration;

use tokio::sync::watch;

/// A cloneable handle: one side requests, every clone can wait for it.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    /// `Some(grace)` once shutdown was requested.
    tx: watch::Sender<Option<Duration>>,
}

impl Shutdown {
    pub(crate) fn new() -> Self {
        Self {
            tx: watch::Sender::new(None),
        }
    }

    /// Requests shutdown, draining for at most `grace`. The first request
    /// wins; later ones (a SIGTERM after `Stop`) only log.
    pub(crate) fn request(&self, grace: Duration, why: &str) {
        self.tx.send_if_modified(|state| {
            // Logged before waiters wake, so it precedes every shutdown log.
            if state.is_some() {
                tracing::info!(reason = why, "already shutting down");
                return false;
            }
            tracing::info!(reason = why, grace = ?grace, "shutting down");
            *state = Some(grace);
            true
        });
    }

    /// Resolves with the grace period once shutdown was requested.
    pub(crate) async fn requested(&self) -> Duration {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        match rx.wait_for(Option::is_some).await {
            Ok(grace) => grace.unwrap_or_default(),
            Err(_) => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_request_wins() {
        let s = Shutdown::new();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.requested().await }
        });
        s.request(Duration::from_secs(3), "test");
        s.request(Duration::from_secs(9), "test again");
        assert_eq!(waiter.await.ok(), Some(Duration::from_secs(3)));
        // Waiting after the fact resolves at once.
        assert_eq!(s.requested().await, Duration::from_secs(3));
    }
}
