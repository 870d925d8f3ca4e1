//! The proxy's `grpc.health.v1.Health`: one shared reporter (tonic-health),
//! fed by the patterns' status channels. Service `""` is SERVING when every
//! pattern is (a pattern with replicas: when one of them is); each
//! process's name is a service that follows it (`NAME`, or `NAME-i` for a
//! replica), and a pattern with replicas has its own name too, SERVING
//! while one of its replicas is; any other name is NOT_FOUND, as the
//! health protocol says.
//!
//! A status is sent only when it changes: `Watch` streams never see the
//! same status twice in a row (tonic-health's reporter would repeat any
//! status it is given). On shutdown the proxy first turns readiness off
//! ([`Phase::Draining`]: `""` is NOT_SERVING while calls are still
//! served), then ends every `Watch` stream ([`Phase::Closing`]) so none
//! holds the exit.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::select_all;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::WatchStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::supervisor::{PatternHandle, Roster, State, Status};

/// The liveness service: SERVING while the proxy's own loops run, whatever
/// its patterns' state (`""` is readiness). Kubernetes: liveness probe on
/// this, readiness and startup on `""`. Reported by [`crate::liveness`].
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

    /// Each pattern with replicas, under its own name.
    async fn set_groups(&mut self, patterns: &[PatternHandle]) {
        for (name, status) in groups(patterns) {
            if patterns.iter().all(|p| p.name() != name) {
                self.set(name, status).await;
            }
        }
    }

    /// Ends `service`'s `Watch` streams: it no longer exists.
    async fn forget(&mut self, service: &str) {
        self.last.remove(service);
        self.reporter.clear_service_status(service).await;
    }

    /// Ends every `Watch` stream (each service's sender is dropped).
    async fn clear(&mut self) {
        for service in std::mem::take(&mut self.last).into_keys() {
            self.reporter.clear_service_status(&service).await;
        }
    }
}

/// Each configured pattern and its status: SERVING while one of its
/// processes is.
fn groups(patterns: &[PatternHandle]) -> Vec<(&str, ServingStatus)> {
    let mut groups: Vec<(&str, ServingStatus)> = Vec::new();
    for p in patterns {
        let status = serving(p.status().state);
        match groups.iter_mut().find(|(name, _)| *name == p.pattern()) {
            Some((_, s)) if status == ServingStatus::Serving => *s = status,
            Some(_) => {}
            None => groups.push((p.pattern(), status)),
        }
    }
    groups
}

/// Has the pattern finished starting, whatever the outcome: serving, kept
/// NOT_SERVING after `startup_timeout`, waiting to restart, FAILED, or
/// stopped after it ran (initially it is STOPPED with no exit yet).
fn started(s: &Status) -> bool {
    match s.state {
        State::Serving | State::NotServing | State::Crashed | State::Failed => true,
        State::Stopped => s.last_exit.is_some(),
        State::Starting | State::Stopping => false,
    }
}

/// Keeps `reporter` in step with every pattern of the current roster and
/// with `phase`, until the phase is [`Phase::Closing`]. A pattern a
/// reload removes is cleared (its `Watch` streams end); one replaced
/// blue/green keeps its name, and its watchers see a change only if the
/// serving status changes. `started_tx` fires once every pattern has
/// finished starting, after `""` says so (the service manager's
/// `READY=1`). `trellis.liveness` is [`crate::liveness`]'s.
pub async fn report(
    reporter: HealthReporter,
    mut roster: watch::Receiver<Arc<Roster>>,
    mut phase: watch::Receiver<Phase>,
    started_tx: oneshot::Sender<()>,
) {
    let mut started_tx = Some(started_tx);
    let mut tell_started = |patterns: &[PatternHandle]| {
        if started_tx.is_some()
            && patterns.iter().all(|p| p.with_status(started))
            && let Some(tx) = started_tx.take()
        {
            let _ = tx.send(());
        }
    };
    let overall = |patterns: &[PatternHandle], phase: Phase| {
        let groups = groups(patterns);
        if phase == Phase::Running && groups.iter().all(|(_, s)| *s == ServingStatus::Serving) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    let mut statuses = Statuses {
        reporter,
        last: HashMap::new(),
    };
    'roster: loop {
        let current = roster.borrow_and_update().clone();
        let patterns = current.patterns();
        let gone: Vec<String> = statuses
            .last
            .keys()
            .filter(|s| {
                !s.is_empty() && patterns.iter().all(|p| p.name() != *s && p.pattern() != *s)
            })
            .cloned()
            .collect();
        for service in gone {
            statuses.forget(&service).await;
        }
        for p in patterns {
            statuses.set(p.name(), serving(p.status().state)).await;
        }
        statuses.set_groups(patterns).await;
        let now = *phase.borrow();
        statuses.set("", overall(patterns, now)).await;
        tell_started(patterns);

        let mut changes = select_all(
            patterns
                .iter()
                .enumerate()
                .map(|(i, p)| WatchStream::from_changes(p.watch()).map(move |s| (i, s.state))),
        );
        loop {
            tokio::select! {
                change = changes.next(), if !changes.is_empty() => {
                    if let Some((i, state)) = change {
                        statuses.set(patterns[i].name(), serving(state)).await;
                        statuses.set_groups(patterns).await;
                    }
                }
                changed = roster.changed() => {
                    if changed.is_ok() {
                        continue 'roster;
                    }
                    // The supervisor is gone: only the phase matters now.
                    let _ = phase.wait_for(|p| *p == Phase::Closing).await;
                    break 'roster;
                }
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Closing {
                        break 'roster;
                    }
                }
            }
            let now = *phase.borrow();
            statuses.set("", overall(patterns, now)).await;
            tell_started(patterns);
        }
    }
    statuses.set("", ServingStatus::NotServing).await;
    statuses.clear().await;
}
