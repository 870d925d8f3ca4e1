//! The proxy's `grpc.health.v1.Health`: one shared reporter (tonic-health),
//! fed by the patterns' status channels. Service `""` is SERVING when every
//! pattern is; each pattern's name is a service that follows its pattern;
//! any other name is NOT_FOUND, as the health protocol says.

use futures::StreamExt;
use futures::stream::select_all;
use tokio_stream::wrappers::WatchStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::supervisor::{PatternHandle, State};

fn serving(state: State) -> ServingStatus {
    if state == State::Serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Keeps `reporter` in step with every pattern until all status channels
/// close (the supervisor is gone).
pub async fn report(reporter: HealthReporter, patterns: Vec<PatternHandle>) {
    let overall = |patterns: &[PatternHandle]| {
        if patterns.iter().all(|p| p.status().state == State::Serving) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    for p in &patterns {
        reporter
            .set_service_status(p.name(), serving(p.status().state))
            .await;
    }
    reporter.set_service_status("", overall(&patterns)).await;

    let mut changes = select_all(
        patterns
            .iter()
            .enumerate()
            .map(|(i, p)| WatchStream::from_changes(p.watch()).map(move |s| (i, s.state))),
    );
    while let Some((i, state)) = changes.next().await {
        reporter
            .set_service_status(patterns[i].name(), serving(state))
            .await;
        reporter.set_service_status("", overall(&patterns)).await;
    }
}
