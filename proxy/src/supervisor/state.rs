//! The supervisor's view of one pattern: its state and the facts shown by the
//! admin API. Published by the pattern's owner task through a
//! `tokio::sync::watch` channel; every reader (router, health, admin) reads a
//! snapshot and never blocks the owner.
//!
//! ```text
//!            spawn ok                 first SERVING
//!  STOPPED ──────────▶ STARTING ─────────────────────▶ SERVING ◀──┐
//!     ▲                 │  │ start failed / exited        │       │ check ok
//!     │ stop            │  ▼                               ▼       │
//!     │             CRASHED (backoff) ◀──── exited ─── NOT_SERVING ┘
//!     │                 │   ▲                  (N failed checks)
//!     │                 └───┘ restart
//!     │  breaker tripped, spawn error, bad config, policy says no
//!     └─────────── FAILED (until an operator starts it)
//! ```
//! Any running state goes to STOPPING on stop or shutdown, then STOPPED.

use std::time::{Duration, SystemTime};

use super::handshake::Endpoint;
use super::process::Exit;
use crate::upstream::Upstream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Serving,
    NotServing,
    Crashed,
    Stopping,
    Stopped,
    Failed,
}

impl State {
    /// Every state, in the order of the enum.
    pub const ALL: [State; 7] = [
        State::Starting,
        State::Serving,
        State::NotServing,
        State::Crashed,
        State::Stopping,
        State::Stopped,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "STARTING",
            State::Serving => "SERVING",
            State::NotServing => "NOT_SERVING",
            State::Crashed => "CRASHED",
            State::Stopping => "STOPPING",
            State::Stopped => "STOPPED",
            State::Failed => "FAILED",
        }
    }

    /// States in which a process exists.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            State::Starting | State::Serving | State::NotServing | State::Stopping
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a pattern's process was started again: the owner decides it where
/// it decides to restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartReason {
    /// The process exited with a code (before or after it was ready).
    Exit,
    /// The process was ended by a signal it did not get from the supervisor
    /// (a crash, the OOM killer, someone's `kill`).
    Signal,
    /// The supervisor killed it for not becoming ready within
    /// `startup_timeout`, failing to start, or no longer answering its
    /// health checks.
    Unhealthy,
    /// The supervisor killed it for exceeding `limits.memory`.
    Memory,
    /// An operator restarted it, or started it after a stop or a failure.
    Operator,
    /// The crash-loop breaker's cool-down ended (`restart.cool_down`).
    CoolDown,
    /// A reload changed its configuration: a new process replaced the old
    /// one blue/green.
    Reload,
}

impl RestartReason {
    pub const ALL: [RestartReason; 7] = [
        RestartReason::Exit,
        RestartReason::Signal,
        RestartReason::Unhealthy,
        RestartReason::Memory,
        RestartReason::Operator,
        RestartReason::CoolDown,
        RestartReason::Reload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Exit => "exit",
            RestartReason::Signal => "signal",
            RestartReason::Unhealthy => "unhealthy",
            RestartReason::Memory => "memory",
            RestartReason::Operator => "operator",
            RestartReason::CoolDown => "cool_down",
            RestartReason::Reload => "reload",
        }
    }

    /// `exit` or `signal`, from how a process the supervisor did not kill ended.
    pub fn of_exit(exit: Exit) -> Self {
        match exit {
            Exit::Code(_) => RestartReason::Exit,
            Exit::Signal(_) => RestartReason::Signal,
        }
    }
}

impl std::fmt::Display for RestartReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Restarts so far, by reason; they add up to [`Status::restarts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restarts([u32; RestartReason::ALL.len()]);

impl Restarts {
    pub fn get(&self, reason: RestartReason) -> u32 {
        self.0[reason as usize]
    }

    pub fn add(&mut self, reason: RestartReason) {
        let n = &mut self.0[reason as usize];
        *n = n.saturating_add(1);
    }
}

/// A snapshot of one pattern.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub pid: Option<u32>,
    pub endpoint: Option<Endpoint>,
    /// The data connection; `Some` only while the process is up and was
    /// reached. Routable only when `state == Serving`.
    pub upstream: Option<Upstream>,
    /// The control channel (Lifecycle, health) to the process; `Some`
    /// exactly when `upstream` is. The metrics scrape asks the pattern for
    /// its own metrics over it.
    pub control: Option<super::secret::Control>,
    /// Every spawn after the first, whoever caused it.
    pub restarts: u32,
    /// `restarts` by reason.
    pub restarts_by: Restarts,
    /// Why the latest restart happened; `None` before the first.
    pub last_restart: Option<RestartReason>,
    /// How long the current process took from spawn to its first SERVING
    /// health check; `None` until it has served.
    pub ready_after: Option<Duration>,
    pub last_exit: Option<Exit>,
    pub last_error: Option<String>,
    pub started_at: Option<SystemTime>,
    pub version: String,
    pub interfaces: Vec<String>,
}

impl Status {
    pub fn new() -> Self {
        Status {
            state: State::Stopped,
            pid: None,
            endpoint: None,
            upstream: None,
            control: None,
            restarts: 0,
            restarts_by: Restarts::default(),
            last_restart: None,
            ready_after: None,
            last_exit: None,
            last_error: None,
            started_at: None,
            version: String::new(),
            interfaces: Vec::new(),
        }
    }

    /// Clears what belongs to a process that is gone.
    pub fn process_gone(&mut self) {
        self.pid = None;
        self.endpoint = None;
        self.upstream = None;
        self.control = None;
        self.started_at = None;
        self.ready_after = None;
    }

    /// The first status of a process that replaces the one `old` reports
    /// (blue/green): the restart counts carry over, plus one for `reason`,
    /// so `restarts` and its metric never go back.
    pub fn succeeding(old: &Status, reason: RestartReason) -> Status {
        let mut s = Status::new();
        s.restarts = old.restarts;
        s.restarts_by = old.restarts_by;
        s.count_restart(reason);
        s
    }

    /// Counts one restart for `reason`.
    pub fn count_restart(&mut self, reason: RestartReason) {
        self.restarts = self.restarts.saturating_add(1);
        self.restarts_by.add(reason);
        self.last_restart = Some(reason);
    }
}

/// One state change, for `WatchPatterns`.
#[derive(Debug, Clone)]
pub struct Event {
    pub time: SystemTime,
    pub previous: State,
    /// The status right after the change (its `last_error` is the reason).
    pub status: Status,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}
