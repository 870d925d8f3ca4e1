//! One pattern's owner task and the handle everyone else uses.
//!
//! The owner task is the only code that holds the pattern's `Child`: it
//! spawns, watches, stops and restarts it, one command at a time. Others talk
//! to it through a [`PatternHandle`]: commands go in over an mpsc channel and
//! come back on a oneshot; status comes out through a `watch` channel. So
//! there is one owner per child, no lock is shared with it, and concurrent
//! operators are serialized by the queue — a second `stop` finds the pattern
//! stopped and says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use tokio::io::BufReader;
use tokio::process::{Child, ChildStdout};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::{Instrument, debug, error, info, warn};
use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;
use trellis_proto::pattern::v1::{
    InitializeRequest, InitializeResponse, StartRequest, StopRequest,
};

use super::backoff::{self, Decision, Ending, RestartSchedule};
use super::cgroup::{self, Cgroups};
use super::handshake::{self, Endpoint};
use super::output::{self, Tail};
use super::ports;
use super::process::{self, Exit, Spec};
use super::state::{Event, RestartReason, State, Status};
use crate::config::{PatternConfig, RestartPolicy};
use crate::upstream::Upstream;

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

enum Command {
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
    name: Arc<str>,
    namespaces: Arc<[String]>,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    events: broadcast::Sender<Event>,
    tail: Tail,
}

impl PatternHandle {
    pub fn name(&self) -> &str {
        &self.name
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

    /// Stops the pattern for good and waits until its process is gone.
    /// Safe to call more than once.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Spawns the owner task for `cfg` and returns its handle. `program` is the
/// resolved executable, or why it could not be resolved. `initial` is the
/// status it starts from: [`Status::new`], or, for a process that replaces
/// another (blue/green), the old one's counts (`Status::succeeding`).
pub fn spawn(
    cfg: PatternConfig,
    program: Result<PathBuf, String>,
    namespaces: Vec<String>,
    socket_dir: PathBuf,
    initial: Status,
    cgroups: Option<Arc<Cgroups>>,
) -> (PatternHandle, tokio::task::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (status_tx, status_rx) = watch::channel(initial);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let tail = Tail::default();
    let span = tracing::info_span!("pattern", pattern = %cfg.name);
    let handle = PatternHandle {
        name: cfg.name.as_str().into(),
        namespaces: namespaces.into(),
        commands: cmd_tx,
        status: status_rx,
        events: events.clone(),
        tail: tail.clone(),
    };
    let owner = Owner {
        poller: None,
        schedule: RestartSchedule::new(cfg.restart.clone()),
        cfg: Arc::new(cfg),
        program,
        socket_dir,
        cgroups,
        status: status_tx,
        events,
        commands: cmd_rx,
        tail,
    };
    let task = tokio::spawn(owner.run().instrument(span));
    (handle, task)
}

struct Owner {
    /// The running process's health poller, aborted before a stop.
    poller: Option<tokio::task::AbortHandle>,
    cfg: Arc<PatternConfig>,
    program: Result<PathBuf, String>,
    socket_dir: PathBuf,
    /// Where each process of this pattern gets a cgroup, if anywhere.
    cgroups: Option<Arc<Cgroups>>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<Event>,
    commands: mpsc::Receiver<Command>,
    tail: Tail,
    schedule: RestartSchedule,
}

/// How one process's life ended.
enum End {
    /// It became ready, then exited on its own.
    Exited(Exit),
    /// It never became ready. `retry` says why another attempt would be a
    /// restart; `None` when another attempt cannot succeed (missing binary,
    /// rejected configuration).
    StartFailed {
        reason: String,
        retry: Option<RestartReason>,
    },
    /// The supervisor ended it (hung: `Unhealthy`; over its memory limit:
    /// `Memory`): a failure.
    Killed(String, RestartReason),
    Stopped(oneshot::Sender<CommandResult>),
    Restart(oneshot::Sender<CommandResult>),
    Shutdown(oneshot::Sender<()>),
}

/// Why a health check did not pass.
#[derive(Debug, Clone, PartialEq)]
enum Unhealthy {
    /// The pattern answered, but not SERVING (e.g. its backend is down).
    NotServing(String),
    /// No answer: timeout, refused connection, transport error.
    NoAnswer(String),
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unhealthy::NotServing(w) | Unhealthy::NoAnswer(w) => f.write_str(w),
        }
    }
}

/// What a wait between restarts ended with.
enum Wait {
    Proceed,
    /// An operator's start or restart cut the wait short.
    Operator,
    Stopped,
    Shutdown(oneshot::Sender<()>),
}

/// A process that answered its handshake, Initialize, Start and a first
/// SERVING health check.
#[derive(Clone)]
struct Up {
    endpoint: Endpoint,
    /// The control channel: Lifecycle and health.
    channel: Channel,
    /// The data connection the data plane forwards calls on.
    upstream: Upstream,
    info: InitializeResponse,
}

impl Owner {
    async fn run(mut self) {
        let mut want_running = true;
        // `restarts` counts every spawn after the first, whoever caused it;
        // `why` is decided wherever the next spawn is decided.
        let mut spawned_before = false;
        let mut why = RestartReason::Operator;
        // Set when the next start is an operator's: it resets the schedule
        // and is not counted toward `max_starts` (operator actions are not
        // crashes). The first start is counted.
        let mut by_operator = false;
        // Why the latest process failed, kept for the breaker's message.
        let mut last_failure: Option<String> = None;
        // Set when the crash-loop breaker failed the pattern and its
        // `restart.cool_down` will start it again.
        let mut cool_down_until: Option<Instant> = None;
        loop {
            if !want_running {
                let command = match cool_down_until {
                    Some(at) => tokio::select! {
                        c = self.commands.recv() => c,
                        _ = tokio::time::sleep_until(at) => {
                            info!("the crash-loop cool-down is over: starting again");
                            cool_down_until = None;
                            self.schedule.reset();
                            why = RestartReason::CoolDown;
                            want_running = true;
                            continue;
                        }
                    },
                    None => self.commands.recv().await,
                };
                // A ping is answered and changes nothing (the cool-down
                // goes on).
                if let Some(Command::Ping(reply)) = command {
                    let _ = reply.send(());
                    continue;
                }
                // An operator's command takes over from the cool-down.
                cool_down_until = None;
                match command {
                    None => return,
                    Some(Command::Shutdown(done)) => {
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Ping(reply)) => {
                        let _ = reply.send(());
                    }
                    Some(Command::Start(reply) | Command::Restart(reply)) => {
                        info!("started by an operator");
                        why = RestartReason::Operator;
                        by_operator = true;
                        want_running = true;
                        let _ = reply.send(Ok(format!("pattern {:?} is starting", self.cfg.name)));
                    }
                    Some(Command::Stop(reply)) => {
                        let state = self.status.borrow().state;
                        let _ = reply.send(Ok(format!(
                            "pattern {:?} is already {}",
                            self.cfg.name,
                            state.as_str().to_lowercase()
                        )));
                    }
                }
                continue;
            }
            if std::mem::take(&mut by_operator) {
                self.schedule.reset();
                last_failure = None;
            } else if !self.schedule.allow_start(Instant::now()) {
                let c = self.schedule.config();
                let until = match c.cool_down {
                    Some(d) => {
                        cool_down_until = Some(Instant::now() + d);
                        format!(
                            "it is started again in {} or when an operator starts it",
                            humantime::format_duration(d)
                        )
                    }
                    None => "it stays down until an operator starts it".to_string(),
                };
                let cause = match &last_failure {
                    Some(f) => format!("; last failure: {f}"),
                    None => String::new(),
                };
                let reason = format!(
                    "crash loop: {} starts within {}{cause}; {until} (`trellis patterns start {}`) — \
                     see its last exit and stderr",
                    c.max_starts,
                    humantime::format_duration(c.start_window),
                    self.cfg.name
                );
                self.set_failed(reason);
                want_running = false;
                continue;
            }
            if spawned_before {
                self.update(|s| s.count_restart(why));
            }
            spawned_before = true;
            let failure = match self.life().await {
                End::Shutdown(done) => {
                    self.set_state(State::Stopped);
                    let _ = done.send(());
                    return;
                }
                End::Stopped(reply) => {
                    self.set_state(State::Stopped);
                    let _ = reply.send(Ok(format!("pattern {:?} stopped", self.cfg.name)));
                    want_running = false;
                    continue;
                }
                End::Restart(reply) => {
                    let _ = reply.send(Ok(format!("pattern {:?} is restarting", self.cfg.name)));
                    why = RestartReason::Operator;
                    by_operator = true;
                    continue;
                }
                End::Exited(exit) => self.after(Ending::Exited(exit)),
                End::Killed(reason, because) => self.after(Ending::Killed {
                    reason: &reason,
                    because,
                }),
                End::StartFailed { reason, retry } => self.after(Ending::StartFailed {
                    reason: &reason,
                    retry,
                }),
            };
            let failure = match failure {
                Decision::Restart {
                    why: because,
                    failure,
                } => {
                    why = because;
                    failure
                }
                Decision::Stopped => {
                    self.set_state(State::Stopped);
                    want_running = false;
                    continue;
                }
                Decision::Failed(reason) => {
                    self.set_failed(reason);
                    want_running = false;
                    continue;
                }
            };
            last_failure = Some(failure.clone());
            match self.wait_before_restart(failure).await {
                Wait::Proceed => {}
                Wait::Operator => {
                    why = RestartReason::Operator;
                    by_operator = true;
                }
                Wait::Stopped => want_running = false,
                Wait::Shutdown(done) => {
                    self.set_state(State::Stopped);
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    /// One process from spawn to exit.
    async fn life(&mut self) -> End {
        let program = match &self.program {
            Ok(p) => p.clone(),
            Err(why) => {
                return End::StartFailed {
                    reason: why.clone(),
                    retry: None,
                };
            }
        };
        let listen = match ports::listen_address(
            &self.cfg.name,
            self.cfg.transport,
            self.cfg.port,
            &self.socket_dir,
        )
        .await
        {
            Ok(l) => l,
            Err(reason) => {
                return End::StartFailed {
                    reason,
                    retry: None,
                };
            }
        };
        let mut env = self.cfg.env.clone();
        {
            use trellis_proto::protocol::{VERSION, env as var};
            env.insert(var::PROTOCOL.into(), VERSION.to_string());
            env.insert(var::NAME.into(), self.cfg.name.clone());
            env.insert(var::LISTEN.into(), listen);
            env.insert(var::LOG_FORMAT.into(), "json".into());
        }
        // Lives as long as this process's life: dropped, it kills whatever
        // the pattern left running and removes itself.
        let cgroup = self
            .cgroups
            .as_ref()
            .and_then(|c| match c.leaf(&self.cfg.name) {
                Ok(leaf) => Some(leaf),
                Err(e) => {
                    warn!(error = %e, "cannot create the pattern's cgroup; it runs without one");
                    None
                }
            });
        let spec = Spec {
            program: &program,
            args: &self.cfg.args,
            env: &env,
            open_files: self.cfg.limits.open_files,
            address_space: self.cfg.limits.address_space.map(|b| b.as_u64()),
            cgroup: cgroup.as_ref().map(cgroup::Leaf::procs),
        };
        let mut child = match process::spawn(&spec) {
            Ok(c) => c,
            Err(e) => {
                return End::StartFailed {
                    reason: format!(
                        "cannot start {}: {e}; check that the file exists, is executable \
                         (chmod +x) and is built for this machine",
                        program.display()
                    ),
                    retry: None,
                };
            }
        };
        let Some(pid) = child.id() else {
            return End::StartFailed {
                reason: format!("{} exited before its pid could be read", program.display()),
                retry: Some(RestartReason::Exit),
            };
        };
        if let Some(leaf) = &cgroup
            && !leaf.holds(pid)
        {
            warn!(
                pid,
                "the pattern could not enter its cgroup; it runs without one"
            );
        }
        let spawned_at = Instant::now();
        self.tail.clear();
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(
                output::forward_stderr(BufReader::new(stderr), self.tail.clone()).in_current_span(),
            );
        }
        let stdout = child.stdout.take();
        self.update(|s| {
            s.state = State::Starting;
            s.process_gone();
            s.pid = Some(pid);
            s.started_at = Some(SystemTime::now());
        });
        info!(pid, program = %program.display(), "spawned");

        // Start-up owns its deadline (`startup_timeout`) and says how it
        // ended: serving, answering NOT_SERVING, or failed at a step.
        let mut bring_up = Box::pin(bring_up(self.cfg.clone(), stdout).in_current_span());
        enum Starting {
            Ready(Result<BroughtUp, StartError>),
            Exited(Option<Exit>),
            Command(Option<Command>),
        }
        let up = loop {
            let event = tokio::select! {
                biased;
                status = child.wait() => Starting::Exited(status.ok().map(Exit::from_status)),
                cmd = self.commands.recv() => Starting::Command(cmd),
                r = &mut bring_up => Starting::Ready(r),
            };
            match event {
                Starting::Ready(Ok(BroughtUp::Serving(up))) => break (up, true),
                Starting::Ready(Ok(BroughtUp::NotServing(up))) => {
                    warn!(
                        pid,
                        "started, but still NOT_SERVING after startup_timeout; keeping it \
                         (not routable) until its health check passes"
                    );
                    self.update(|s| {
                        s.last_error = Some(
                            "answers its health check with NOT_SERVING since start-up (is its backend reachable?)"
                                .into(),
                        )
                    });
                    break (up, false);
                }
                Starting::Ready(Err(StartError::Timeout)) => {
                    let exit = process::kill(&mut child, pid).await;
                    self.record_exit(exit);
                    return End::StartFailed {
                        reason: format!(
                            "not ready within startup_timeout ({}): no handshake, connection, \
                             Initialize/Start or SERVING health check in time; killed it{}",
                            humantime::format_duration(self.cfg.startup_timeout),
                            self.stderr_hint()
                        ),
                        retry: Some(RestartReason::Unhealthy),
                    };
                }
                Starting::Ready(Err(e)) => {
                    // Give a child that is exiting a moment to do so, so the
                    // error can say how it ended rather than that we killed it.
                    let (ended, because) =
                        match process::wait_for(&mut child, Duration::from_millis(200)).await {
                            Some(exit) => {
                                // The pattern's own exit: that is its last exit.
                                self.record_exit(exit);
                                (
                                    format!("process ended with {exit}"),
                                    RestartReason::of_exit(exit),
                                )
                            }
                            None => {
                                // The proxy's kill is not the pattern's exit:
                                // `last_exit` keeps the pattern's own, and the
                                // error says who ended it.
                                let exit = process::kill(&mut child, pid).await;
                                self.update(|s| s.process_gone());
                                (
                                    format!("the proxy ended it ({exit})"),
                                    RestartReason::Unhealthy,
                                )
                            }
                        };
                    let stderr = self.stderr_hint();
                    return End::StartFailed {
                        reason: format!("start failed: {e}; {ended}{stderr}"),
                        retry: e.is_retryable().then_some(because),
                    };
                }
                Starting::Exited(exit) => {
                    let exit = exit.unwrap_or(Exit::Code(-1));
                    self.record_exit(exit);
                    return End::StartFailed {
                        reason: format!(
                            "exited with {exit} before it was ready{}",
                            self.stderr_hint()
                        ),
                        retry: Some(RestartReason::of_exit(exit)),
                    };
                }
                Starting::Command(cmd @ (Some(Command::Ping(_)) | Some(Command::Start(_)))) => {
                    // Answered; the start goes on.
                    let _ = self.command_while_running(cmd, &mut child, pid, None).await;
                }
                Starting::Command(cmd) => {
                    // A stop, restart or shutdown while starting: cancel the
                    // start first (no call of ours stays in flight for the
                    // pattern to wait on), then end the process at once.
                    drop(bring_up);
                    let end = match cmd {
                        Some(Command::Stop(reply)) => End::Stopped(reply),
                        Some(Command::Restart(reply)) => End::Restart(reply),
                        Some(Command::Shutdown(done)) => End::Shutdown(done),
                        // Every handle is gone (or a command answered above).
                        _ => End::Shutdown(oneshot::channel().0),
                    };
                    self.stop_process(&mut child, pid, None).await;
                    return end;
                }
            }
        };

        let (
            Up {
                endpoint,
                channel,
                upstream,
                info,
            },
            serving,
        ) = up;
        let took = spawned_at.elapsed();
        if took > self.cfg.slow_start_warning {
            warn!(
                startup_ms = took.as_millis() as u64,
                warning_ms = self.cfg.slow_start_warning.as_millis() as u64,
                "slow start: the pattern took longer than slow_start_warning to serve"
            );
        }
        info!(
            pid,
            endpoint = %endpoint,
            version = %info.version,
            startup_ms = took.as_millis() as u64,
            serving,
            "started"
        );
        self.update(|s| {
            s.state = if serving {
                State::Serving
            } else {
                State::NotServing
            };
            s.endpoint = Some(endpoint);
            s.upstream = Some(upstream);
            s.control = Some(channel.clone());
            s.version = info.version.clone();
            s.interfaces = info.interfaces.clone();
            s.ready_after = serving.then_some(took);
        });
        let serving_since = Instant::now();
        let (health_tx, mut health_rx) = mpsc::channel(4);
        let poller = tokio::spawn(
            poll_health(
                channel.clone(),
                self.cfg.health.interval,
                self.cfg.health.timeout,
                health_tx,
            )
            .in_current_span(),
        );
        self.poller = Some(poller.abort_handle());
        let _poller_guard = AbortOnDrop(poller);
        let mut failures = 0u32;
        let mut no_answers = 0u32;
        let memory_limit = self.cfg.limits.memory.map(|b| b.as_u64());
        let mut memory_tick = tokio::time::interval(self.cfg.health.interval);
        memory_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        enum Running {
            Exited(Option<Exit>),
            Command(Option<Command>),
            Health(Option<Result<(), Unhealthy>>),
            MemoryTick,
        }
        loop {
            let event = tokio::select! {
                biased;
                status = child.wait() => Running::Exited(status.ok().map(Exit::from_status)),
                cmd = self.commands.recv() => Running::Command(cmd),
                h = health_rx.recv() => Running::Health(h),
                _ = memory_tick.tick(), if memory_limit.is_some() => Running::MemoryTick,
            };
            match event {
                Running::Exited(exit) => {
                    let exit = exit.unwrap_or(Exit::Code(-1));
                    // Anything the pattern forked dies with it.
                    process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                    self.schedule.served(serving_since.elapsed());
                    self.record_exit(exit);
                    warn!(pid, %exit, "pattern exited");
                    return End::Exited(exit);
                }
                Running::Command(cmd) => {
                    if let Some(end) = self
                        .command_while_running(cmd, &mut child, pid, Some(channel.clone()))
                        .await
                    {
                        return end;
                    }
                }
                Running::MemoryTick => {
                    let (Some(limit), Some(rss)) = (memory_limit, process::rss_bytes(pid)) else {
                        continue;
                    };
                    if rss > limit {
                        let reason = format!(
                            "memory limit exceeded: resident {} > limits.memory {}",
                            bytesize::ByteSize(rss),
                            bytesize::ByteSize(limit)
                        );
                        warn!(pid, rss, limit, "{reason}; restarting");
                        self.stop_process(&mut child, pid, Some(channel.clone()))
                            .await;
                        self.schedule.served(serving_since.elapsed());
                        return End::Killed(reason, RestartReason::Memory);
                    }
                }
                Running::Health(None) => {}
                Running::Health(Some(Ok(()))) => {
                    failures = 0;
                    no_answers = 0;
                    if self.status.borrow().state != State::Serving {
                        info!("health check passes again");
                        // A process kept NOT_SERVING since start-up serves
                        // for the first time now.
                        let ready_after = spawned_at.elapsed();
                        self.update(|s| {
                            s.state = State::Serving;
                            s.ready_after.get_or_insert(ready_after);
                        });
                    }
                }
                Running::Health(Some(Err(unhealthy))) => {
                    failures += 1;
                    let why = match &unhealthy {
                        Unhealthy::NotServing(w) => {
                            no_answers = 0;
                            w.clone()
                        }
                        Unhealthy::NoAnswer(w) => {
                            no_answers += 1;
                            w.clone()
                        }
                    };
                    debug!(failures, no_answers, %why, "health check failed");
                    if no_answers >= self.cfg.health.failure_threshold
                        && self.cfg.health.restart_when_unresponsive
                        && self.cfg.restart.policy != RestartPolicy::Never
                    {
                        let reason = format!(
                            "unresponsive: {no_answers} health checks in a row got no answer \
                             (last: {why}); restarting it"
                        );
                        warn!(pid, "{reason}");
                        self.stop_process(&mut child, pid, Some(channel.clone()))
                            .await;
                        self.schedule.served(serving_since.elapsed());
                        return End::Killed(reason, RestartReason::Unhealthy);
                    }
                    if failures >= self.cfg.health.failure_threshold
                        && self.status.borrow().state == State::Serving
                    {
                        warn!(failures, %why, "pattern is not serving");
                        self.update(|s| {
                            s.state = State::NotServing;
                            s.last_error = Some(format!(
                                "{failures} consecutive health checks failed; last: {why}"
                            ));
                        });
                    }
                }
            }
        }
    }

    /// Handles a command that arrives while a process exists. Returns how
    /// the life ends, or `None` to keep going.
    async fn command_while_running(
        &mut self,
        cmd: Option<Command>,
        child: &mut Child,
        pid: u32,
        channel: Option<Channel>,
    ) -> Option<End> {
        match cmd {
            Some(Command::Ping(reply)) => {
                let _ = reply.send(());
                None
            }
            Some(Command::Start(reply)) => {
                let _ = reply.send(Err(CommandError::AlreadyRunning(self.cfg.name.clone())));
                None
            }
            Some(Command::Stop(reply)) => {
                self.stop_process(child, pid, channel).await;
                Some(End::Stopped(reply))
            }
            Some(Command::Restart(reply)) => {
                self.stop_process(child, pid, channel).await;
                Some(End::Restart(reply))
            }
            Some(Command::Shutdown(done)) => {
                self.stop_process(child, pid, channel).await;
                Some(End::Shutdown(done))
            }
            None => {
                // Every handle is gone: nobody can ever stop us, so stop now.
                self.stop_process(child, pid, channel).await;
                let (done, _) = oneshot::channel();
                Some(End::Shutdown(done))
            }
        }
    }

    /// Lifecycle Stop → wait `stop_grace` → SIGTERM to the group → wait
    /// `stop_grace` → SIGKILL. Without a Lifecycle connection (the process
    /// is still starting) there is no Stop to send or wait for: SIGTERM to
    /// the group at once → wait `stop_grace` → SIGKILL. Always reaps.
    async fn stop_process(&mut self, child: &mut Child, pid: u32, channel: Option<Channel>) {
        self.set_state(State::Stopping);
        // End the health Watch stream first: an open stream is an in-flight
        // call the pattern would otherwise wait on for its whole grace period.
        if let Some(poller) = self.poller.take() {
            poller.abort();
        }
        let grace = self.cfg.stop_grace;
        let Some(ch) = channel else {
            debug!(pid, "still starting: no Stop to send; signalling at once");
            let exit = process::terminate(child, pid, grace).await;
            info!(pid, %exit, "stopped while starting");
            self.record_exit(exit);
            return;
        };
        {
            let req = StopRequest {
                grace: prost_types::Duration::try_from(grace).ok(),
            };
            let mut client = LifecycleClient::new(ch);
            match tokio::time::timeout(grace, client.stop(req)).await {
                Ok(Ok(_)) => debug!("lifecycle Stop acknowledged"),
                Ok(Err(status)) => debug!(%status, "lifecycle Stop failed; will signal"),
                Err(_) => debug!("lifecycle Stop timed out; will signal"),
            }
        }
        let exit = match process::wait_for(child, grace).await {
            Some(exit) => {
                process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                exit
            }
            None => process::terminate(child, pid, grace).await,
        };
        info!(pid, %exit, "stopped");
        self.record_exit(exit);
    }

    /// The restart rule for this pattern's policy ([`backoff::decide`]).
    fn after(&self, ending: Ending<'_>) -> Decision {
        backoff::decide(self.cfg.restart.policy, ending)
    }

    async fn wait_before_restart(&mut self, why: String) -> Wait {
        let delay = self.schedule.next_delay();
        if delay.is_zero() {
            warn!(reason = %why, delay_ms = 0u64, "restarting at once");
        } else {
            warn!(reason = %why, delay_ms = delay.as_millis() as u64, "restarting after a delay");
        }
        self.update(|s| {
            s.state = State::Crashed;
            s.last_error = Some(why);
        });
        // A ping is answered without ending the wait.
        let until = Instant::now() + delay;
        loop {
            let cmd = tokio::select! {
                _ = tokio::time::sleep_until(until) => return Wait::Proceed,
                cmd = self.commands.recv() => cmd,
            };
            return match cmd {
                Some(Command::Ping(reply)) => {
                    let _ = reply.send(());
                    continue;
                }
                None => Wait::Shutdown(oneshot::channel().0),
                Some(Command::Shutdown(done)) => Wait::Shutdown(done),
                Some(Command::Stop(reply)) => {
                    self.set_state(State::Stopped);
                    let _ = reply.send(Ok(format!(
                        "pattern {:?} stopped (a restart was pending)",
                        self.cfg.name
                    )));
                    Wait::Stopped
                }
                Some(Command::Start(reply) | Command::Restart(reply)) => {
                    let _ = reply.send(Ok(format!(
                        "pattern {:?} is starting now instead of after its backoff",
                        self.cfg.name
                    )));
                    Wait::Operator
                }
            };
        }
    }

    /// Every status change goes through here: the watch channel gets the
    /// new snapshot, and a change of state is also broadcast as an [`Event`]
    /// (a watch channel keeps only the latest value; the event stream keeps
    /// every transition for `WatchPatterns`).
    fn update(&mut self, f: impl FnOnce(&mut Status)) {
        let previous = self.status.borrow().state;
        self.status.send_modify(f);
        let now = self.status.borrow().clone();
        if now.state != previous {
            debug!(from = %previous, to = %now.state, "state change");
            let _ = self.events.send(Event {
                time: SystemTime::now(),
                previous,
                status: now,
            });
        }
    }

    fn record_exit(&mut self, exit: Exit) {
        self.update(|s| {
            s.last_exit = Some(exit);
            s.process_gone();
        });
    }

    fn set_state(&mut self, state: State) {
        self.update(|s| {
            s.state = state;
            if !state.is_running() {
                s.process_gone();
            }
        });
    }

    fn set_failed(&mut self, reason: String) {
        error!(reason = %reason, "pattern failed");
        self.update(|s| {
            s.state = State::Failed;
            s.last_error = Some(reason);
            s.process_gone();
        });
    }

    fn stderr_hint(&self) -> String {
        let last = self.tail.last(3);
        if last.is_empty() {
            String::new()
        } else {
            format!("; last stderr: {last}")
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why bringing a process up failed, at which step.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("the child's stdout was not piped")]
    NoStdout,
    #[error("{0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("cannot connect to {endpoint}: {error}")]
    Connect {
        endpoint: Endpoint,
        error: tonic::transport::Error,
    },
    /// `INVALID_ARGUMENT` from Initialize: a restart cannot fix it.
    #[error(
        "the pattern rejected its configuration (the `config:` block of pattern {pattern:?}): \
         {message}"
    )]
    RejectedConfig { pattern: String, message: String },
    #[error("Initialize failed: {0}")]
    Initialize(tonic::Status),
    #[error("Start failed: {0}")]
    Start(tonic::Status),
    #[error("opening the data connection failed: {0}")]
    DataConnection(String),
    /// `startup_timeout` passed before a SERVING answer, and the pattern
    /// never answered its health check at all.
    #[error("not ready within startup_timeout")]
    Timeout,
}

/// How a start-up that did not fail ended.
enum BroughtUp {
    Serving(Up),
    /// Up and answering, but NOT_SERVING when `startup_timeout` came: kept,
    /// not routable, until its health check passes.
    NotServing(Up),
}

impl StartError {
    /// Whether starting again may succeed: everything but a configuration
    /// the pattern rejected (fixing it takes an operator or a reload).
    fn is_retryable(&self) -> bool {
        !matches!(self, StartError::RejectedConfig { .. })
    }
}

/// Handshake → connect → Initialize → Start → first SERVING, within
/// `startup_timeout`. Owns nothing but the child's stdout, so the owner can
/// keep waiting on the child and its commands while this runs (and drop it
/// to cancel the start).
async fn bring_up(
    cfg: Arc<PatternConfig>,
    stdout: Option<ChildStdout>,
) -> Result<BroughtUp, StartError> {
    let deadline = Instant::now() + cfg.startup_timeout;
    let steps = async {
        let stdout = stdout.ok_or(StartError::NoStdout)?;
        let mut reader = BufReader::new(stdout);
        let endpoint = handshake::read(&mut reader).await?;
        tokio::spawn(output::drain_stdout(reader).in_current_span());
        debug!(endpoint = %endpoint, "handshake received");

        let channel = connect(&endpoint).await?;
        let mut lifecycle = LifecycleClient::new(channel.clone());
        let init = InitializeRequest {
            name: cfg.name.clone(),
            config: Some(trellis_proto::json::to_struct(&cfg.config)),
            protocol_version: trellis_proto::PATTERN_PROTOCOL_VERSION,
        };
        let info = match lifecycle.initialize(init).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                return Err(StartError::RejectedConfig {
                    pattern: cfg.name.clone(),
                    message: s.message().to_string(),
                });
            }
            Err(s) => return Err(StartError::Initialize(s)),
        };
        lifecycle
            .start(StartRequest {})
            .await
            .map_err(StartError::Start)?;
        let upstream = Upstream::connect(&cfg.name, endpoint.clone(), &info.interfaces)
            .await
            .map_err(|e| StartError::DataConnection(e.to_string()))?;
        Ok(Up {
            endpoint,
            channel,
            upstream,
            info,
        })
    };
    let up = tokio::time::timeout_at(deadline, steps)
        .await
        .map_err(|_| StartError::Timeout)??;

    // The first SERVING answer makes the pattern routable. Poll briskly: a
    // pattern built on the SDK is SERVING as soon as Start returns.
    let mut health = HealthClient::new(up.channel.clone());
    let pause = cfg.health.interval.min(Duration::from_millis(50));
    let mut answered_not_serving = false;
    let first_serving = tokio::time::timeout_at(deadline, async {
        loop {
            match check(&mut health, cfg.health.timeout).await {
                Ok(()) => return,
                Err(why) => {
                    if matches!(why, Unhealthy::NotServing(_)) {
                        answered_not_serving = true;
                    }
                    debug!(%why, "not serving yet");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    })
    .await;
    match first_serving {
        Ok(()) => Ok(BroughtUp::Serving(up)),
        Err(_) if answered_not_serving => Ok(BroughtUp::NotServing(up)),
        Err(_) => Err(StartError::Timeout),
    }
}

/// Connects with exponential backoff (100 ms doubling to 2 s, 8 attempts);
/// each failed attempt is logged with the delay before the next.
async fn connect(endpoint: &Endpoint) -> Result<Channel, StartError> {
    let attempt = || async { open_channel(endpoint).await };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_factor(2.0)
                .with_max_times(8),
        )
        .notify(|e: &tonic::transport::Error, delay: Duration| {
            warn!(endpoint = %endpoint, error = %e, delay_ms = delay.as_millis() as u64, "connect failed; retrying");
        })
        .await
        .map_err(|error| StartError::Connect {
            endpoint: endpoint.clone(),
            error,
        })
}

async fn open_channel(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect()
                .await
        }
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused by the connector.
            tonic::transport::Endpoint::from_static("http://pattern.invalid")
                .connect_with_connector(tower::service_fn(move |_: http_uri::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        }
    }
}

mod http_uri {
    pub use tonic::codegen::http::Uri;
}

async fn check(client: &mut HealthClient<Channel>, limit: Duration) -> Result<(), Unhealthy> {
    let req = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(limit, client.check(req)).await {
        Err(_) => Err(Unhealthy::NoAnswer(format!(
            "no answer within {}",
            humantime::format_duration(limit)
        ))),
        Ok(Err(status)) => Err(Unhealthy::NoAnswer(format!(
            "{}: {}",
            status.code(),
            status.message()
        ))),
        Ok(Ok(resp)) => serving_status(resp.into_inner().status()),
    }
}

fn serving_status(s: ServingStatus) -> Result<(), Unhealthy> {
    match s {
        ServingStatus::Serving => Ok(()),
        other => Err(Unhealthy::NotServing(format!(
            "health status is {}",
            other.as_str_name()
        ))),
    }
}

/// Reports health to the owner two ways at once: a `Health/Watch` stream, so
/// a change is seen the moment the pattern reports it, and a `Check` every
/// `interval`, which also catches a hung process (a watch stream just goes
/// quiet). A pattern without `Watch` (UNIMPLEMENTED) gets polling alone.
async fn poll_health(
    channel: Channel,
    interval: Duration,
    limit: Duration,
    results: mpsc::Sender<Result<(), Unhealthy>>,
) {
    let watch = {
        let results = results.clone();
        let mut client = HealthClient::new(channel.clone());
        async move {
            loop {
                let req = HealthCheckRequest {
                    service: String::new(),
                };
                match client.watch(req).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while let Ok(Some(msg)) = stream.message().await {
                            if results.send(serving_status(msg.status())).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(s) if s.code() == tonic::Code::Unimplemented => return,
                    Err(_) => {}
                }
                // The stream broke; the periodic check reports the cause.
                tokio::time::sleep(interval).await;
            }
        }
    };
    let poll = async move {
        let mut client = HealthClient::new(channel);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; bring_up just checked
        loop {
            ticker.tick().await;
            let r = check(&mut client, limit).await;
            if results.send(r).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(watch, poll);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rejected_configuration_is_not_worth_a_restart() {
        let rejected = StartError::RejectedConfig {
            pattern: "mem".into(),
            message: "config.x: must be a number".into(),
        };
        assert!(!rejected.is_retryable());
        assert!(
            rejected.to_string().contains("pattern \"mem\""),
            "{rejected}"
        );
        for e in [
            StartError::NoStdout,
            StartError::Initialize(tonic::Status::unavailable("backend down")),
            StartError::Start(tonic::Status::internal("boom")),
            StartError::DataConnection("refused".into()),
            StartError::Handshake(handshake::HandshakeError::Eof),
            StartError::Timeout,
        ] {
            assert!(e.is_retryable(), "{e}");
        }
    }
}
