//! One pattern's owner task. It is the only code that holds the pattern's
//! `Child`: it spawns, watches, stops and restarts it, one command at a
//! time. Others talk to it through a [`PatternHandle`] (`handle.rs`), so
//! there is one owner per child, no lock is shared with it, and concurrent
//! operators are serialized by the queue — a second `stop` finds the
//! pattern stopped and says so. Start-up is `startup.rs`, health probing
//! `probe.rs`, the restart decision `backoff.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::BufReader;
use tokio::process::Child;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, warn};
use trellis_proto::pattern::v1::StopRequest;
use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;

use super::backoff::{self, Decision, Ending, RestartSchedule};
use super::cgroup::{self, Cgroups};
use super::handle::{Command, CommandError, CommandResult, EVENT_BUFFER, PatternHandle};
use super::output::{self, Tail};
use super::ports;
use super::probe::{Unhealthy, poll_health};
use super::process::{self, Exit, Spec};
use super::secret::{Control, Secret};
use super::sockets::Sockets;
use super::startup::{BroughtUp, StartError, Up, bring_up};
use super::state::{Event, RestartReason, State, Status};
use crate::config::{PatternConfig, RestartPolicy};

/// Spawns the owner task for `cfg` and returns its handle. `program` is the
/// resolved executable, or why it could not be resolved. `initial` is the
/// status it starts from: [`Status::new`], or, for a process that replaces
/// another (blue/green), the old one's counts (`Status::succeeding`).
pub fn spawn(
    cfg: PatternConfig,
    replica: Option<u32>,
    program: Result<PathBuf, String>,
    namespaces: Vec<String>,
    sockets: Arc<Sockets>,
    initial: Status,
    cgroups: Option<Arc<Cgroups>>,
) -> (PatternHandle, tokio::task::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (status_tx, status_rx) = watch::channel(initial);
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let tail = Tail::default();
    // From here on the process goes by its own name (its socket, cgroup,
    // logs, Initialize, errors): `PATTERN-i` for a replica.
    let pattern: Arc<str> = cfg.name.as_str().into();
    let mut cfg = cfg;
    cfg.name = cfg.replica_name(replica);
    let span = tracing::info_span!("pattern", pattern = %cfg.name);
    let handle = PatternHandle {
        name: cfg.name.as_str().into(),
        pattern,
        replica,
        namespaces: namespaces.into(),
        commands: cmd_tx,
        status: status_rx,
        events: events.clone(),
        tail: tail.clone(),
        load: Arc::default(),
        stop_grace: cfg.stop_grace,
    };
    let owner = Owner {
        poller: None,
        schedule: RestartSchedule::new(cfg.restart.clone()),
        cfg: Arc::new(cfg),
        program,
        sockets,
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
    /// Where a unix-socket start's socket goes.
    sockets: Arc<Sockets>,
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

/// What a wait between restarts ended with.
enum Wait {
    Proceed,
    /// An operator's start or restart cut the wait short.
    Operator,
    Stopped,
    Shutdown(oneshot::Sender<()>),
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
            &self.sockets,
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
        // Fresh for this process: its environment carries it (never its
        // argv, never a log line), every call to it carries it back.
        let secret = Secret::generate();
        let mut env = self.cfg.env.clone();
        {
            use trellis_proto::protocol::{VERSION, env as var};
            env.insert(var::PROTOCOL.into(), VERSION.to_string());
            env.insert(var::NAME.into(), self.cfg.name.clone());
            env.insert(var::LISTEN.into(), listen);
            env.insert(var::LOG_FORMAT.into(), "json".into());
            env.insert(var::SECRET.into(), secret.env_value().into());
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
        let mut bring_up = Box::pin(bring_up(self.cfg.clone(), stdout, secret).in_current_span());
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
        channel: Option<Control>,
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
    async fn stop_process(&mut self, child: &mut Child, pid: u32, channel: Option<Control>) {
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
