//! The liveness watchdog behind health service `trellis.liveness`
//! ([`crate::health::LIVENESS`]) and, under systemd, `WATCHDOG=1`.
//!
//! Liveness says whether the proxy's *own* loops run, whatever its
//! patterns do (a crash-looping or FAILED pattern is the supervisor
//! working, not a stuck proxy). A tick task checks, every
//! [`Settings::interval`]:
//! - **the runtime is not starved**: the tick itself ran within
//!   [`Settings::max_lateness`] of its schedule (a worker blocked by
//!   synchronous work, or a runtime overloaded for seconds, makes it late);
//! - **every pattern's owner task answers**: a no-op `Ping` goes through
//!   its command queue ([`PatternHandle::ping`]) and must be answered
//!   within [`Settings::owner_timeout`]. An owner that is stopping its
//!   process legitimately takes no command for up to three `stop_grace`s
//!   (Lifecycle Stop, SIGTERM, SIGKILL), so it gets that much more. A ping
//!   is left outstanding across ticks rather than awaited, so one slow
//!   owner never delays the tick, and so never the watchdog ping.
//!
//! Both fine → SERVING and, when systemd asked for a watchdog,
//! `WATCHDOG=1`; anything wrong → NOT_SERVING (logged with what is stuck)
//! and no `WATCHDOG=1`, so systemd's `WatchdogSec` restarts a proxy that
//! stays stuck. A status goes to the reporter only when it changes (a
//! `Watch` on `trellis.liveness` never sees the same status twice in a
//! row). The task ends when the doors close ([`Phase::Closing`]) and
//! removes the service, which ends every `Watch` on it with the drain.
//!
//! A runtime stuck completely (every worker blocked) runs no tick at all:
//! that shows as a probe timeout, and under systemd as a missed watchdog.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::config::Config;
use crate::health::{LIVENESS, Phase};
use crate::supervisor::{PatternHandle, State};

/// How often liveness is checked without a systemd watchdog.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long an owner task may leave a ping unanswered.
pub const OWNER_TIMEOUT: Duration = Duration::from_secs(5);
/// How late a tick may run before the runtime counts as starved.
pub const MAX_LATENESS: Duration = Duration::from_secs(2);

/// The watchdog's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub interval: Duration,
    pub owner_timeout: Duration,
    pub max_lateness: Duration,
    /// Send `WATCHDOG=1` on each tick that finds the proxy alive.
    pub systemd_watchdog: bool,
}

impl Settings {
    /// The defaults; with a systemd watchdog (its ping interval, from
    /// [`crate::notify::watchdog_interval`]) the tick is at least that
    /// frequent.
    pub fn new(watchdog_interval: Option<Duration>) -> Self {
        Settings {
            interval: watchdog_interval.map_or(INTERVAL, |w| w.min(INTERVAL)),
            owner_timeout: OWNER_TIMEOUT,
            max_lateness: MAX_LATENESS,
            systemd_watchdog: watchdog_interval.is_some(),
        }
    }
}

/// One owner task as the watchdog sees it.
pub trait Owner: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Resolves `true` once the owner took a no-op command from its queue,
    /// `false` when the owner task has ended.
    fn ping(&self) -> impl Future<Output = bool> + Send;
    /// Extra time the owner may legitimately take right now.
    fn busy_allowance(&self) -> Duration;
    /// Whether `other` is the same owner task (a blue/green replacement
    /// has the same name and another owner).
    fn same(&self, other: &Self) -> bool;
}

/// A pattern's owner task, with the time it may spend stopping its process.
#[derive(Clone)]
pub struct PatternOwner {
    pub handle: PatternHandle,
    pub stop_grace: Duration,
}

impl Owner for PatternOwner {
    fn name(&self) -> &str {
        self.handle.name()
    }

    async fn ping(&self) -> bool {
        self.handle.ping().await.is_ok()
    }

    fn busy_allowance(&self) -> Duration {
        // `stop_process`: Lifecycle Stop, then SIGTERM, then SIGKILL, each
        // waited on for up to `stop_grace`, with no command taken meanwhile.
        if self.handle.with_status(|s| s.state) == State::Stopping {
            self.stop_grace * 3
        } else {
            Duration::ZERO
        }
    }

    fn same(&self, other: &Self) -> bool {
        self.handle.same_owner(&other.handle)
    }
}

/// The watchdog's view of every pattern's owner task, each with its
/// pattern's `stop_grace` from `config`.
pub fn owners(handles: &[PatternHandle], config: &Config) -> Vec<Arc<PatternOwner>> {
    handles
        .iter()
        .map(|h| {
            let stop_grace = config
                .patterns
                .iter()
                .find(|p| p.name == h.name())
                .map_or(Duration::ZERO, |p| p.stop_grace);
            Arc::new(PatternOwner {
                handle: h.clone(),
                stop_grace,
            })
        })
        .collect()
}

/// Where the verdict goes: the proxy's health reporter, or a test's log.
pub trait Sink: Send {
    fn set(&mut self, status: ServingStatus) -> impl Future<Output = ()> + Send;
    /// Removes the service, ending every `Watch` on it.
    fn clear(&mut self) -> impl Future<Output = ()> + Send;
}

impl Sink for HealthReporter {
    async fn set(&mut self, status: ServingStatus) {
        self.set_service_status(LIVENESS, status).await;
    }

    async fn clear(&mut self) {
        self.clear_service_status(LIVENESS).await;
    }
}

/// A ping in flight: when it was sent and the task awaiting the answer.
struct Pending {
    sent: Instant,
    answer: JoinHandle<bool>,
}

/// Runs the watchdog until `phase` is [`Phase::Closing`] (or its sender is
/// gone), then clears the liveness service. `owners` gives the owner
/// tasks to check at each tick (a reload changes them): a ping in flight
/// to an owner that is no longer listed is dropped, not counted.
pub async fn run<O: Owner>(
    mut owners: impl FnMut() -> Vec<Arc<O>> + Send,
    settings: Settings,
    mut phase: watch::Receiver<Phase>,
    mut sink: impl Sink,
) {
    let mut watched: Vec<(Arc<O>, Option<Pending>)> = Vec::new();
    let mut last: Option<ServingStatus> = None;
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if *phase.borrow() == Phase::Closing {
            break;
        }
        let scheduled = tokio::select! {
            t = ticker.tick() => t,
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        };
        let now = Instant::now();
        let mut problems = Vec::new();
        let late = now.saturating_duration_since(scheduled);
        if late > settings.max_lateness {
            problems.push(format!(
                "the runtime is starved: the liveness tick ran {} late (allowed {})",
                humantime::format_duration(late),
                humantime::format_duration(settings.max_lateness)
            ));
        }
        let mut next = Vec::new();
        for owner in owners() {
            let slot = match watched.iter().position(|(w, _)| w.same(&owner)) {
                Some(i) => watched.swap_remove(i).1,
                None => None,
            };
            next.push((owner, slot));
        }
        for (_, gone) in std::mem::replace(&mut watched, next) {
            if let Some(p) = gone {
                p.answer.abort();
            }
        }
        for (owner, slot) in watched.iter_mut() {
            if let Some(p) = slot {
                match (&mut p.answer).now_or_never() {
                    Some(Ok(true)) => *slot = None,
                    Some(Ok(false) | Err(_)) => {
                        problems.push(format!(
                            "pattern {:?}: its owner task has ended",
                            owner.name()
                        ));
                        // Ask again: a pattern that is gone stays a problem.
                        *slot = None;
                    }
                    None => {
                        let waited = now.saturating_duration_since(p.sent);
                        let allowed = settings.owner_timeout + owner.busy_allowance();
                        if waited > allowed {
                            problems.push(format!(
                                "pattern {:?}: its owner task has not taken a command for {} \
                                 (allowed {})",
                                owner.name(),
                                humantime::format_duration(round_ms(waited)),
                                humantime::format_duration(allowed)
                            ));
                        }
                    }
                }
            }
            if slot.is_none() {
                let owner = owner.clone();
                *slot = Some(Pending {
                    sent: now,
                    answer: tokio::spawn(async move { owner.ping().await }),
                });
            }
        }
        let status = if problems.is_empty() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            match status {
                ServingStatus::Serving if last.is_some() => {
                    info!("liveness is SERVING again: the proxy's loops run")
                }
                ServingStatus::Serving => {}
                _ => warn!("liveness is NOT_SERVING: {}", problems.join("; ")),
            }
            last = Some(status);
            sink.set(status).await;
        }
        if status == ServingStatus::Serving && settings.systemd_watchdog {
            crate::notify::watchdog();
        }
    }
    for p in watched.into_iter().filter_map(|(_, p)| p) {
        p.answer.abort();
    }
    sink.clear().await;
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::{mpsc, oneshot};

    /// An owner task with a command queue, that can be made stuck: while
    /// stuck it takes nothing from its queue, as an owner blocked in an
    /// await that never ends would.
    struct FakeOwner {
        queue: mpsc::Sender<oneshot::Sender<()>>,
        stuck: watch::Sender<bool>,
        stopping: AtomicBool,
    }

    impl FakeOwner {
        fn spawn() -> Arc<FakeOwner> {
            let (queue, mut rx) = mpsc::channel::<oneshot::Sender<()>>(64);
            let (stuck, mut stuck_rx) = watch::channel(false);
            tokio::spawn(async move {
                loop {
                    if stuck_rx.wait_for(|s| !*s).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        cmd = rx.recv() => match cmd {
                            Some(reply) => { let _ = reply.send(()); }
                            None => return,
                        },
                        changed = stuck_rx.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            Arc::new(FakeOwner {
                queue,
                stuck,
                stopping: AtomicBool::new(false),
            })
        }
    }

    impl Owner for FakeOwner {
        fn name(&self) -> &str {
            "fake"
        }
        async fn ping(&self) -> bool {
            let (tx, rx) = oneshot::channel();
            self.queue.send(tx).await.is_ok() && rx.await.is_ok()
        }
        fn busy_allowance(&self) -> Duration {
            if self.stopping.load(Ordering::SeqCst) {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            }
        }
        fn same(&self, other: &Self) -> bool {
            self.queue.same_channel(&other.queue)
        }
    }

    /// Every status the watchdog reported, in order; `None` = cleared.
    struct Log(mpsc::UnboundedSender<Option<ServingStatus>>);

    impl Sink for Log {
        async fn set(&mut self, status: ServingStatus) {
            let _ = self.0.send(Some(status));
        }
        async fn clear(&mut self) {
            let _ = self.0.send(None);
        }
    }

    fn settings() -> Settings {
        Settings::new(None)
    }

    struct Running {
        log: mpsc::UnboundedReceiver<Option<ServingStatus>>,
        phase: watch::Sender<Phase>,
        task: JoinHandle<()>,
    }

    fn start(owners: Vec<Arc<FakeOwner>>) -> Running {
        let (tx, log) = mpsc::unbounded_channel();
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let task = tokio::spawn(run(move || owners.clone(), settings(), phase_rx, Log(tx)));
        Running { log, phase, task }
    }

    /// The next status reported; the paused clock advances while waiting.
    async fn next(
        log: &mut mpsc::UnboundedReceiver<Option<ServingStatus>>,
    ) -> Option<ServingStatus> {
        tokio::time::timeout(Duration::from_secs(3600), log.recv())
            .await
            .expect("a status within an hour of paused time")
            .expect("the log is open")
    }

    /// Lets the watchdog run for `d` of paused time.
    async fn run_for(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_owner_turns_liveness_off_and_an_answering_one_back_on() {
        let owner = FakeOwner::spawn();
        let mut w = start(vec![owner.clone()]);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));

        owner.stuck.send_replace(true);
        let stuck_at = Instant::now();
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::NotServing));
        let took = stuck_at.elapsed();
        // Noticed after the owner timeout, within a tick or two of it.
        assert!(took > OWNER_TIMEOUT, "{took:?}");
        assert!(took <= OWNER_TIMEOUT + 2 * INTERVAL, "{took:?}");

        owner.stuck.send_replace(false);
        let unstuck_at = Instant::now();
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        assert!(
            unstuck_at.elapsed() <= 2 * INTERVAL,
            "{:?}",
            unstuck_at.elapsed()
        );

        // Healthy for a long while: nothing more is reported.
        run_for(Duration::from_secs(60)).await;
        assert!(
            w.log.try_recv().is_err(),
            "a status repeated while nothing changed"
        );

        w.phase.send_replace(Phase::Closing);
        w.task.await.unwrap();
        assert_eq!(
            w.log.recv().await,
            Some(None),
            "the service is cleared at Closing"
        );
        assert!(w.log.recv().await.is_none(), "nothing after the clear");
    }

    #[tokio::test(start_paused = true)]
    async fn staying_stuck_reports_not_serving_once() {
        let owner = FakeOwner::spawn();
        let mut w = start(vec![owner.clone()]);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        owner.stuck.send_replace(true);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::NotServing));
        run_for(Duration::from_secs(120)).await;
        assert!(w.log.try_recv().is_err(), "NOT_SERVING was repeated");
    }

    #[tokio::test(start_paused = true)]
    async fn one_stuck_owner_among_healthy_ones_is_enough() {
        let owners: Vec<_> = (0..3).map(|_| FakeOwner::spawn()).collect();
        let mut w = start(owners.clone());
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        owners[1].stuck.send_replace(true);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::NotServing));
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_busy_stopping_its_process_gets_its_stop_time() {
        let owner = FakeOwner::spawn();
        let mut w = start(vec![owner.clone()]);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        owner.stopping.store(true, Ordering::SeqCst);
        owner.stuck.send_replace(true);
        // Past the owner timeout but within its allowance: still alive.
        run_for(OWNER_TIMEOUT + Duration::from_secs(20)).await;
        assert!(
            w.log.try_recv().is_err(),
            "liveness turned off during a stop"
        );
        // Past the allowance: stuck.
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::NotServing));
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_that_has_ended_is_a_problem() {
        // Its queue's receiver is gone, as when the owner task has ended.
        let (queue, _) = mpsc::channel(1);
        let ended = Arc::new(FakeOwner {
            queue,
            stuck: watch::channel(false).0,
            stopping: AtomicBool::new(false),
        });
        let mut w = start(vec![ended]);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::NotServing));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_is_a_starved_runtime() {
        let owner = FakeOwner::spawn();
        let mut w = start(vec![owner]);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        // The clock jumps while no task runs: exactly what a starved
        // runtime looks like to the tick that finally runs.
        tokio::time::advance(INTERVAL + MAX_LATENESS + Duration::from_millis(500)).await;
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::NotServing));
        // The next tick is on time again.
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_keeps_it_running_and_closing_ends_it() {
        let owner = FakeOwner::spawn();
        let mut w = start(vec![owner]);
        assert_eq!(next(&mut w.log).await, Some(ServingStatus::Serving));
        w.phase.send_replace(Phase::Draining);
        run_for(Duration::from_secs(10)).await;
        assert!(!w.task.is_finished(), "liveness stays on while draining");
        assert!(w.log.try_recv().is_err());
        w.phase.send_replace(Phase::Closing);
        w.task.await.unwrap();
        assert_eq!(w.log.recv().await, Some(None));
    }

    #[test]
    fn the_tick_follows_the_systemd_watchdog() {
        let s = Settings::new(Some(Duration::from_millis(100)));
        assert_eq!(s.interval, Duration::from_millis(100));
        assert!(s.systemd_watchdog);
        let s = Settings::new(Some(Duration::from_secs(30)));
        assert_eq!(s.interval, INTERVAL);
        let s = Settings::new(None);
        assert_eq!(s.interval, INTERVAL);
        assert!(!s.systemd_watchdog);
    }
}
