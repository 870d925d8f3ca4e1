//! The proxy's `grpc.health.v1.Health`: one shared reporter (tonic-health),
//! fed by the patterns' status channels. Service `""` is SERVING when every
//! pattern is; each pattern's name is a service that follows its pattern;
//! any other name is NOT_FOUND, as the health protocol says.
//!
//! A status is sent only when it changes: `Watch` streams never see the
//! same status twice in a row (tonic-health's reporter would repeat any
//! status it is given). On shutdown the proxy first turns readiness off
//! ([`Phase::Draining`]: `""` is NOT_SERVING while calls are still
//! served), then ends every `Watch` stream ([`Phase::Closing`]) so none
//! holds the exit.

use std::collections::HashMap;

use futures::StreamExt;
use futures::stream::select_all;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::supervisor::{PatternHandle, State};

/// The liveness service: SERVING while the proxy's own loops run, whatever
/// its patterns' state (`""` is readiness). Kubernetes: liveness probe on
/// this, readiness and startup on `""`.
pub const LIVENESS: &str = "trellis.liveness";

/// Where the proxy is in its life, as health reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Shutting down, still serving: readiness (`""`) off.
    Draining,
    /// The doors are closing: every `Watch` stream ends.
    Closing,
}

fn serving(state: State) -> ServingStatus {
    if state == State::Serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The reporter, and what it last said per service: a status goes out
/// only when it changes.
struct Statuses {
    reporter: HealthReporter,
    last: HashMap<String, ServingStatus>,
}

impl Statuses {
    async fn set(&mut self, service: &str, status: ServingStatus) {
        if self.last.get(service) != Some(&status) {
            self.last.insert(service.to_string(), status);
            self.reporter.set_service_status(service, status).await;
        }
    }

    /// Ends every `Watch` stream (each service's sender is dropped).
    async fn clear(&mut self) {
        for service in std::mem::take(&mut self.last).into_keys() {
            self.reporter.clear_service_status(&service).await;
        }
    }
}

/// Keeps `reporter` in step with every pattern and with `phase`, until the
/// phase is [`Phase::Closing`] or the supervisor is gone.
pub async fn report(
    reporter: HealthReporter,
    patterns: Vec<PatternHandle>,
    mut phase: watch::Receiver<Phase>,
) {
    let overall = |patterns: &[PatternHandle], phase: Phase| {
        if phase == Phase::Running && patterns.iter().all(|p| p.status().state == State::Serving) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let mut statuses = Statuses {
        reporter,
        last: HashMap::new(),
    };
    for p in &patterns {
        statuses.set(p.name(), serving(p.status().state)).await;
    }
    let now = *phase.borrow();
    statuses.set("", overall(&patterns, now)).await;
    statuses.set(LIVENESS, ServingStatus::Serving).await;

    let mut changes = select_all(
        patterns
            .iter()
            .enumerate()
            .map(|(i, p)| WatchStream::from_changes(p.watch()).map(move |s| (i, s.state))),
    );
    loop {
        tokio::select! {
            change = changes.next() => {
                let Some((i, state)) = change else { break };
                statuses.set(patterns[i].name(), serving(state)).await;
            }
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow() == Phase::Closing {
                    break;
                }
            }
        }
        let now = *phase.borrow();
        statuses.set("", overall(&patterns, now)).await;
    }
    statuses.set("", ServingStatus::NotServing).await;
    statuses.clear().await;
}
