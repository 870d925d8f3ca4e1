//! What `grpc.health.v1.Health` answers: `NOT_SERVING` until `Start`
//! succeeded, then whatever the pattern's [`Pattern::health`] hook says,
//! polled every [`POLL_INTERVAL`] (bounded by [`HOOK_TIMEOUT`]), and
//! `NOT_SERVING` again once shutdown begins.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::MissedTickBehavior;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::lifecycle::Slot;
use crate::shutdown::Shutdown;
use crate::{Health, Pattern};

/// How often the pattern's health hook is polled. Four times a second, so a
/// backend's death shows as NOT_SERVING well within a second and its return
/// as SERVING soon after: a PING or `SELECT 1` at this rate costs nothing
/// measurable.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long one call of the health hook may take before it counts as
/// NOT_SERVING.
pub(crate) const HOOK_TIMEOUT: Duration = Duration::from_secs(1);

/// Publishes one status for `""` (the whole pattern) and every data service.
pub(crate) struct HealthPublisher {
    reporter: HealthReporter,
    services: Vec<&'static str>,
    /// Held across the reporter update so a poll that started before `close`
    /// cannot publish `SERVING` after it.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last: Option<Health>,
    closed: bool,
}

impl HealthPublisher {
    /// Starts every service at `NOT_SERVING`.
    pub(crate) async fn new(reporter: HealthReporter, interfaces: &[&'static str]) -> Self {
        let mut services = vec![""];
        services.extend_from_slice(interfaces);
        for service in &services {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        Self {
            reporter,
            services,
            state: Mutex::new(State::default()),
        }
    }

    /// Publishes `health`, logging when it changes. Ignored after `close`.
    pub(crate) async fn publish(&self, health: Health) {
        let mut state = self.state.lock().await;
        if state.closed || state.last.as_ref() == Some(&health) {
            return;
        }
        match &health {
            Health::Serving => tracing::info!("health: SERVING"),
            Health::NotServing(reason) => tracing::warn!(reason = %reason, "health: NOT_SERVING"),
        }
        let status = match health {
            Health::Serving => ServingStatus::Serving,
            Health::NotServing(_) => ServingStatus::NotServing,
        };
        self.set_all(status).await;
        state.last = Some(health);
    }

    /// `NOT_SERVING` for good: the pattern is shutting down.
    pub(crate) async fn close(&self) {
        let mut state = self.state.lock().await;
        if !state.closed {
            state.closed = true;
            self.set_all(ServingStatus::NotServing).await;
        }
    }

    async fn set_all(&self, status: ServingStatus) {
        for service in &self.services {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// Asks the pattern, bounded by [`HOOK_TIMEOUT`].
pub(crate) async fn check<P: Pattern>(pattern: &P) -> Health {
    tokio::time::timeout(HOOK_TIMEOUT, pattern.health())
        .await
        .unwrap_or_else(|_| {
            Health::NotServing(format!(
                "the health hook did not answer within {HOOK_TIMEOUT:?}"
            ))
        })
}

/// Polls the started pattern every [`POLL_INTERVAL`] until shutdown.
pub(crate) async fn poll<P: Pattern>(
    slot: Arc<Slot<P>>,
    publisher: Arc<HealthPublisher>,
    shutdown: Shutdown,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.requested() => return,
            _ = ticks.tick() => {}
        }
        if let Some(pattern) = slot.started() {
            publisher.publish(check(&*pattern).await).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Request;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus as Wire};
    use tonic_health::server::HealthService;

    use super::*;

    async fn status(service: &HealthService, name: &str) -> Wire {
        let req = Request::new(HealthCheckRequest {
            service: name.into(),
        });
        match service.check(req).await {
            Ok(resp) => resp.into_inner().status(),
            Err(status) => panic!("check({name:?}) failed: {status}"),
        }
    }

    #[tokio::test]
    async fn not_serving_until_published_and_after_close() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let publisher = HealthPublisher::new(reporter, &["trellis.data.v1.KeyValue"]).await;
        for name in ["", "trellis.data.v1.KeyValue"] {
            assert_eq!(status(&service, name).await, Wire::NotServing);
        }

        publisher.publish(Health::Serving).await;
        for name in ["", "trellis.data.v1.KeyValue"] {
            assert_eq!(status(&service, name).await, Wire::Serving);
        }

        publisher
            .publish(Health::NotServing("db down".into()))
            .await;
        assert_eq!(status(&service, "").await, Wire::NotServing);
        publisher.publish(Health::Serving).await;
        assert_eq!(status(&service, "").await, Wire::Serving);

        publisher.close().await;
        assert_eq!(status(&service, "").await, Wire::NotServing);
        publisher.publish(Health::Serving).await;
        assert_eq!(status(&service, "").await, Wire::NotServing);
    }
}
