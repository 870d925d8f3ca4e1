//! [`PatternHandle`]: what everyone but the owner task holds of a pattern.
//! Commands go in over an mpsc channel and come back on a oneshot; status
//! comes out through a `watch` channel and every change on a `broadcast`.
//! The owner task (`pattern.rs`) serializes the commands, so concurrent
//! operators never race on a child.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::output::Tail;
use super::state::{Event, Status};

/// State changes a slow `WatchPatterns` client may fall behind by.
pub const EVENT_BUFFER: usize = 256;

/// What an operator command answers: a sentence for a human either way.
pub type CommandResult = Result<String, CommandError>;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CommandError {
    #[error("pattern {0:?} is already running; use restart to replace its process")]
    AlreadyRunning(String),
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("no pattern is named {0:?}")]
    NotFound(String),
    /// A blue/green replacement whose new process never served; the old
    /// one keeps serving.
    #[error("{0}")]
    NotReplaced(String),
}

pub(super) enum Command {
    Start(oneshot::Sender<CommandResult>),
    Stop(oneshot::Sender<CommandResult>),
    Restart(oneshot::Sender<CommandResult>),
    Shutdown(oneshot::Sender<()>),
    /// A no-op round trip through the queue: the liveness watchdog's proof
    /// that the owner task still takes commands.
    Ping(oneshot::Sender<()>),
}

/// A cheap, cloneable reference to one supervised pattern.
#[derive(Clone, Debug)]
pub struct PatternHandle {
    /// The process's name: the pattern's, or `PATTERN-i` for a replica.
    pub(super) name: Arc<str>,
    /// The configured pattern this process runs (its `name:`).
    pub(super) pattern: Arc<str>,
    /// Which replica it is, when the pattern has more than one.
    pub(super) replica: Option<u32>,
    pub(super) namespaces: Arc<[String]>,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) status: watch::Receiver<Status>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) tail: Tail,
    /// What the data plane puts on this process (calls in flight, its
    /// outlier record).
    pub(super) load: Arc<crate::dataplane::Load>,
    /// Its `stop_grace`: also how long a process leaving the routes may
    /// take to finish the calls already sent to it.
    pub(super) stop_grace: std::time::Duration,
}

impl PatternHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configured pattern this process is (a replica of).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Its index among the pattern's replicas; `None` when it is the
    /// pattern's only process.
    pub fn replica(&self) -> Option<u32> {
        self.replica
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The same pattern (same owner, same process) serving `namespaces`:
    /// how a reload moves namespaces without touching a process.
    pub fn with_namespaces(&self, namespaces: Vec<String>) -> PatternHandle {
        PatternHandle {
            namespaces: namespaces.into(),
            ..self.clone()
        }
    }

    /// Whether `other` is a handle on the same owner (and so the same
    /// process), whatever namespaces each carries.
    pub fn same_owner(&self, other: &PatternHandle) -> bool {
        self.commands.same_channel(&other.commands)
    }

    /// A snapshot of the current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Reads the current status in place, without copying it (the data
    /// plane does this on every call). `f` must not block: the owner
    /// waits for it to publish the next status.
    pub fn with_status<R>(&self, f: impl FnOnce(&Status) -> R) -> R {
        f(&self.status.borrow())
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Every state change from now on, in order. A receiver that falls more
    /// than [`EVENT_BUFFER`] events behind is told it lagged.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The data plane's counts for this process (the balancer's input).
    pub fn load(&self) -> &Arc<crate::dataplane::Load> {
        &self.load
    }

    pub fn stderr_tail(&self) -> Vec<String> {
        self.tail.lines()
    }

    pub async fn start(&self) -> CommandResult {
        self.ask(Command::Start).await
    }

    pub async fn stop(&self) -> CommandResult {
        self.ask(Command::Stop).await
    }

    pub async fn restart(&self) -> CommandResult {
        self.ask(Command::Restart).await
    }

    /// Resolves when the owner task has taken a no-op command from its
    /// queue: it is not stuck. Fails when the owner task has ended.
    pub async fn ping(&self) -> Result<(), CommandError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Ping(tx))
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        rx.await.map_err(|_| CommandError::ShuttingDown)
    }

    async fn ask(&self, make: fn(oneshot::Sender<CommandResult>) -> Command) -> CommandResult {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        rx.await.map_err(|_| CommandError::ShuttingDown)?
    }

    /// Once it is out of the routes: waits (for at most its `stop_grace`)
    /// until the calls already sent to it are answered (streams opened),
    /// then stops it for
    /// good, as [`PatternHandle::shutdown`]. Without the wait, a call
    /// picked just before the switch could reach a process already told
    /// to stop, which refuses it.
    pub async fn retire(&self) {
        if !self.load.idle(self.stop_grace).await {
            tracing::info!(
                pattern = %self.name,
                in_flight = self.load.in_flight(),
                "calls still unanswered after stop_grace; stopping it anyway: its Stop \
                 drains them"
            );
        }
        self.shutdown().await;
    }

    /// Stops the pattern for good and waits until its process is gone.
    /// Safe to call more than once.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
