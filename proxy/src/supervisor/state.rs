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

use std::time::SystemTime;

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

/// A snapshot of one pattern.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub pid: Option<u32>,
    pub endpoint: Option<Endpoint>,
    /// The data connection; `Some` only while the process is up and was
    /// reached. Routable only when `state == Serving`.
    pub upstream: Option<Upstream>,
    pub restarts: u32,
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
            restarts: 0,
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
        self.started_at = None;
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
