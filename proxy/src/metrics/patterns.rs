//! Supervision metrics, per pattern, read from the supervisor's
//! [`PatternHandle`]s without ever blocking its owner tasks:
//!
//! - `trellis_pattern_state{pattern,state}`: one gauge per state, 1 for the
//!   current one;
//! - `trellis_pattern_up{pattern}`: 1 while SERVING;
//! - `trellis_pattern_restarts_total{pattern,reason}`: restarts by reason
//!   (`exit`, `signal`, `unhealthy`, `memory`, `operator`); they add up to
//!   the `restarts` the admin API shows;
//! - `trellis_pattern_resident_memory_bytes{pattern}`: the process's
//!   resident memory, from `/proc/<pid>/statm`;
//! - `trellis_pattern_start_duration_seconds{pattern}`: spawn → first
//!   SERVING, one observation per process that served;
//! - `trellis_replica_calls_total{pattern,replica}`: attempts the balancer
//!   sent to each process (a replica `NAME-i`, or a pattern's only one,
//!   `replica` = `pattern`), `trellis_replica_in_flight` of them now,
//!   `trellis_replica_ejected` (1 while outlier detection leaves it out)
//!   and `trellis_replica_ejections_total`; a process replaced blue/green
//!   starts again from 0.
//!
//! All but the last are read at scrape time from the status snapshot (a
//! [`Collector`]): the restart counts are cumulative in the status, so no
//! restart is lost however rarely Prometheus scrapes. Start durations are
//! observations, so a task per pattern takes them from the event stream
//! (`PatternHandle::events`, a broadcast the owner never waits on).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast::error::RecvError;

use super::histogram::AtomicHistogram;
use std::sync::Arc;

use tokio::sync::watch;

use crate::supervisor::{PatternHandle, RestartReason, Roster, State, Status};

/// Bucket bounds, in seconds, for spawn → first SERVING: a pattern on the
/// SDK serves in tens of milliseconds; one waiting for its backend, or a
/// slow one, takes up to `startup_timeout` (30 s by default).
pub const START_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatternLabels {
    pub pattern: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    pattern: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    pattern: String,
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    pattern: String,
    reason: &'static str,
}

fn start_histogram() -> AtomicHistogram {
    AtomicHistogram::new(START_SECONDS)
}

type StartHistograms = Family<PatternLabels, AtomicHistogram, fn() -> AtomicHistogram>;

/// The supervision metrics; dropping it stops its watcher tasks.
pub struct PatternMetrics {
    start: StartHistograms,
    watcher: Option<tokio::task::AbortHandle>,
}

impl PatternMetrics {
    /// Registers the supervision metrics of the patterns in `roster` (and
    /// of every later roster) in `registry`. Call it inside the tokio
    /// runtime: it spawns a task that watches each pattern process's
    /// events for the start durations.
    pub fn new(roster: watch::Receiver<Arc<Roster>>, registry: &mut Registry) -> Self {
        let start: StartHistograms = Family::new_with_constructor(start_histogram);
        registry.register(
            "trellis_pattern_start_duration_seconds",
            "Time from spawning a pattern process to its first SERVING health check",
            start.clone(),
        );
        registry.register_collector(Box::new(Supervision {
            roster: roster.clone(),
        }));
        let watcher = tokio::spawn(watch_roster(roster, start.clone())).abort_handle();
        PatternMetrics {
            start,
            watcher: Some(watcher),
        }
    }

    /// No patterns (for tests).
    pub fn none(registry: &mut Registry) -> Self {
        let (_, roster) = watch::channel(Arc::new(Roster::default()));
        let start: StartHistograms = Family::new_with_constructor(start_histogram);
        registry.register(
            "trellis_pattern_start_duration_seconds",
            "Time from spawning a pattern process to its first SERVING health check",
            start.clone(),
        );
        registry.register_collector(Box::new(Supervision { roster }));
        PatternMetrics {
            start,
            watcher: None,
        }
    }

    /// The start-duration histogram of `pattern`.
    pub fn start_durations(&self, pattern: &str) -> AtomicHistogram {
        self.start
            .get_or_create(&PatternLabels {
                pattern: pattern.to_string(),
            })
            .clone()
    }
}

impl Drop for PatternMetrics {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            w.abort();
        }
    }
}

/// One start-duration watcher per pattern handle the rosters name (a
/// blue/green replacement is a new handle: its starts are watched too);
/// a watcher ends with its owner task. Dropped (aborted), it aborts them.
async fn watch_roster(mut roster: watch::Receiver<Arc<Roster>>, start: StartHistograms) {
    let mut watchers = tokio::task::JoinSet::new();
    let mut watched: Vec<PatternHandle> = Vec::new();
    loop {
        let current = roster.borrow_and_update().clone();
        watched.retain(|w| current.patterns().iter().any(|p| p.same_owner(w)));
        for h in current.patterns() {
            if watched.iter().any(|w| w.same_owner(h)) {
                continue;
            }
            let labels = PatternLabels {
                pattern: h.name().to_string(),
            };
            // Created now, so every pattern has the series from the start.
            let histogram = start.get_or_create(&labels).clone();
            watchers.spawn(watch_starts(h.clone(), histogram));
            watched.push(h.clone());
        }
        // Reap finished watchers as we go, so the set stays small.
        while watchers.try_join_next().is_some() {}
        if roster.changed().await.is_err() {
            break;
        }
    }
    while watchers.join_next().await.is_some() {}
}

/// Observes each process's spawn → first SERVING once, keyed by pid so an
/// event seen twice (the snapshot and the stream overlap) counts once.
async fn watch_starts(pattern: PatternHandle, histogram: AtomicHistogram) {
    // Subscribe before reading the snapshot: a start that completes in
    // between is then in the stream, and the pid check drops the repeat.
    let mut events = pattern.events();
    let mut counted: Option<u32> = None;
    let mut observe = |status: &Status| {
        if let (Some(pid), Some(took)) = (status.pid, status.ready_after)
            && counted != Some(pid)
        {
            counted = Some(pid);
            histogram.observe(took.as_secs_f64());
        }
    };
    pattern.with_status(&mut observe);
    loop {
        match events.recv().await {
            Ok(event) => observe(&event.status),
            // Fell behind a burst of state changes: the current process's
            // start is still in the snapshot; earlier ones in the burst are
            // not counted.
            Err(RecvError::Lagged(_)) => pattern.with_status(&mut observe),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Reads every pattern's status at scrape time.
#[derive(Debug)]
struct Supervision {
    roster: watch::Receiver<Arc<Roster>>,
}

/// One of the balancer's metric families: name, help, type, and its
/// value for one process.
type ReplicaFamily = (&'static str, &'static str, MetricType, fn(&Reading) -> u64);

/// What a scrape needs from one status, copied out so the owner's watch
/// channel is held only for the copy.
struct Reading {
    pattern: String,
    /// The configured pattern it is a replica of.
    group: String,
    state: State,
    pid: Option<u32>,
    restarts: [u32; RestartReason::ALL.len()],
    calls: u64,
    in_flight: u32,
    ejected: bool,
    ejections: u64,
}

impl Collector for Supervision {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let roster = self.roster.borrow().clone();
        let readings: Vec<Reading> = roster
            .patterns()
            .iter()
            .map(|h| {
                h.with_status(|s| Reading {
                    pattern: h.name().to_string(),
                    group: h.pattern().to_string(),
                    state: s.state,
                    pid: s.pid,
                    restarts: RestartReason::ALL.map(|r| s.restarts_by.get(r)),
                    calls: h.load().calls(),
                    in_flight: h.load().in_flight(),
                    ejected: h.load().ejected(s.pid),
                    ejections: h.load().ejections(),
                })
            })
            .collect();

        let mut m = encoder.encode_descriptor(
            "trellis_pattern_state",
            "The pattern's supervision state: 1 for the current state, 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for r in &readings {
            for state in State::ALL {
                let labels = StateLabels {
                    pattern: r.pattern.clone(),
                    state: state.as_str(),
                };
                ConstGauge::new(i64::from(r.state == state)).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "trellis_pattern_up",
            "1 while the pattern is SERVING (routable), else 0.",
            None,
            MetricType::Gauge,
        )?;
        for r in &readings {
            let labels = PatternLabels {
                pattern: r.pattern.clone(),
            };
            ConstGauge::new(i64::from(r.state == State::Serving))
                .encode(m.encode_family(&labels)?)?;
        }

        // Encoded as `trellis_pattern_restarts_total`.
        let mut m = encoder.encode_descriptor(
            "trellis_pattern_restarts",
            "Restarts of the pattern's process by reason: exit (exited with a code), signal \
             (killed by a signal the supervisor did not send), unhealthy (killed for not \
             becoming ready or not answering health checks), memory (killed over limits.memory), \
             operator (restarted or started by an operator), cool_down (the crash-loop \
             breaker's cool-down ended), reload (replaced because a reload changed its \
             configuration).",
            None,
            MetricType::Counter,
        )?;
        for r in &readings {
            for (reason, n) in RestartReason::ALL.iter().zip(r.restarts) {
                let labels = ReasonLabels {
                    pattern: r.pattern.clone(),
                    reason: reason.as_str(),
                };
                ConstCounter::new(u64::from(n)).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "trellis_pattern_resident_memory_bytes",
            "Resident memory of the pattern's process (from /proc/<pid>/statm); absent while no \
             process runs.",
            None,
            MetricType::Gauge,
        )?;
        for r in &readings {
            let Some(bytes) = r.pid.and_then(resident_bytes) else {
                continue;
            };
            let labels = PatternLabels {
                pattern: r.pattern.clone(),
            };
            ConstGauge::new(bytes).encode(m.encode_family(&labels)?)?;
        }

        // The balancer's figures: one family each, the same labels.
        let families: [ReplicaFamily; 4] = [
            (
                // Encoded as `trellis_replica_calls_total`.
                "trellis_replica_calls",
                "Data calls (attempts) the balancer sent to the process.",
                MetricType::Counter,
                |r| r.calls,
            ),
            (
                "trellis_replica_in_flight",
                "Data calls sent to the process and not yet answered (a stream until it opens): \
                 the balancer's least-request input.",
                MetricType::Gauge,
                |r| u64::from(r.in_flight),
            ),
            (
                "trellis_replica_ejected",
                "1 while outlier detection leaves the replica out of the balancing, else 0.",
                MetricType::Gauge,
                |r| u64::from(r.ejected),
            ),
            (
                "trellis_replica_ejections",
                "Times outlier detection ejected the replica.",
                MetricType::Counter,
                |r| r.ejections,
            ),
        ];
        for (name, help, kind, value) in families {
            let mut m = encoder.encode_descriptor(name, help, None, kind)?;
            for r in &readings {
                let labels = ReplicaLabels {
                    pattern: r.group.clone(),
                    replica: r.pattern.clone(),
                };
                let family = m.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(r)).encode(family)?,
                    _ => ConstGauge::new(value(r) as i64).encode(family)?,
                }
            }
        }
        Ok(())
    }
}

/// Resident memory of `pid` in bytes: the second field of
/// `/proc/<pid>/statm`, in pages. `None` when the process is gone.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(super::process::page_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_of_this_process_is_read() {
        let rss = resident_bytes(std::process::id()).unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
        assert!(resident_bytes(u32::MAX).is_none());
    }

    #[test]
    fn the_start_histogram_has_second_buckets() {
        let mut registry = Registry::default();
        let family: StartHistograms = Family::new_with_constructor(start_histogram);
        registry.register("s", "s", family.clone());
        family
            .get_or_create(&PatternLabels {
                pattern: "mem".into(),
            })
            .observe(0.04);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains(r#"le="0.05",pattern="mem"} 1"#), "{out}");
        assert!(out.contains(r#"le="0.025",pattern="mem"} 0"#), "{out}");
    }
}
