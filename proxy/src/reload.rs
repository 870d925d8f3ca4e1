//! Changing a running proxy: reloads (SIGHUP, `trellis reload`, admin
//! `Reload`) and the blue/green replacement of one pattern (`trellis
//! patterns restart`). One task owns the [`Supervisor`] and applies one
//! change at a time, in the order asked (as an owner task serializes a
//! pattern's commands); the [`Reloader`] handle queues work for it.
//!
//! A reload reads and validates the whole file first and changes nothing
//! unless all of it can be applied. Patterns are diffed by name, as
//! `supervisorctl update` does: an unchanged one keeps its process (its
//! namespaces may move), an added one starts, a removed one drains and
//! stops, a changed one is replaced blue/green — the new process starts
//! beside the old and takes the namespaces only once it is SERVING. Then
//! routes and policies switch for new calls in one store
//! ([`DataPlane::reconfigure`]), the roster is published, and what was
//! replaced or removed is drained and stopped in the background.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::config::{self, Config, Loaded, Problem};
use crate::dataplane::DataPlane;
use crate::doors::Doors;
use crate::shutdown::CancellationToken;
use crate::supervisor::{
    self, CommandError, CommandResult, PatternHandle, RestartReason, Roster, State, Status,
    Supervisor,
};

/// What a reload did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub source: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub replaced: Vec<String>,
    pub unchanged: Vec<String>,
    /// Listeners re-bound, e.g. `listen.http 127.0.0.1:8981 → 0.0.0.0:8981`.
    pub rebound: Vec<String>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "reloaded {}: added {}; removed {}; replaced {}; unchanged {}",
            self.source,
            list(&self.added),
            list(&self.removed),
            list(&self.replaced),
            list(&self.unchanged)
        )?;
        if !self.rebound.is_empty() {
            write!(f, "; re-bound {}", self.rebound.join(", "))?;
        }
        Ok(())
    }
}

/// Why a reload changed nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid, or changes what cannot change
    /// while the proxy runs: every problem, each naming its field.
    #[error("{}", invalid(.source_name, .problems))]
    Invalid {
        source_name: String,
        problems: Vec<Problem>,
    },
    /// A changed pattern's new process did not become SERVING; the old
    /// one keeps serving.
    #[error(
        "pattern {pattern:?}: its new process did not take over because {why}; the old process \
         keeps serving and nothing was changed"
    )]
    NotServing { pattern: String, why: String },
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

fn invalid(source: &str, problems: &[Problem]) -> String {
    let mut s = format!(
        "the configuration in {source} was not applied ({} problem{}); the proxy keeps running \
         the one it had:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str(&format!("\n  - {}: {}", p.field, p.message));
    }
    s
}

enum Request {
    /// The doors, once the server has opened them.
    Doors(Box<Doors>),
    Reload(oneshot::Sender<Result<Applied, ReloadError>>),
    Operator(String, Operator, oneshot::Sender<CommandResult>),
    Shutdown(oneshot::Sender<()>),
}

/// An operator's command on one pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Start,
    Stop,
    /// Blue/green for a SERVING pattern, in place otherwise.
    Restart,
}

/// Queues reloads and operator commands for the task that owns the
/// supervisor: they apply one at a time, so a command never reaches a
/// process a reload or a replacement is retiring.
#[derive(Clone)]
pub struct Reloader {
    requests: mpsc::Sender<Request>,
    roster: watch::Receiver<Arc<Roster>>,
    config: watch::Receiver<Arc<Config>>,
}

impl Reloader {
    /// Starts the task owning `supervisor`; `loaded` is what it runs now.
    /// The task gives up any wait for a new process once `closing` is
    /// cancelled.
    pub fn start(
        supervisor: Supervisor,
        loaded: Loaded,
        data: DataPlane,
        closing: CancellationToken,
    ) -> Reloader {
        let (requests, rx) = mpsc::channel(16);
        let roster = supervisor.roster();
        let (config_tx, config) = watch::channel(Arc::new(loaded.config.clone()));
        let task = Task {
            supervisor,
            loaded,
            data,
            closing,
            config: config_tx,
            doors: None,
        };
        tokio::spawn(task.run(rx));
        Reloader {
            requests,
            roster,
            config,
        }
    }

    /// The patterns running now, and every change.
    pub fn roster(&self) -> watch::Receiver<Arc<Roster>> {
        self.roster.clone()
    }

    /// The configuration the proxy runs now.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Hands the open doors to the task: a reload re-binds them, and
    /// [`Reloader::shutdown`] closes them before stopping the patterns.
    pub async fn doors(&self, doors: Doors) {
        let _ = self.requests.send(Request::Doors(Box::new(doors))).await;
    }

    /// Reads the configuration again and applies it.
    pub async fn reload(&self) -> Result<Applied, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Reload(tx))
            .await
            .map_err(|_| ReloadError::ShuttingDown)?;
        rx.await.map_err(|_| ReloadError::ShuttingDown)?
    }

    /// An operator's command on pattern `name`. A restart replaces a
    /// SERVING pattern blue/green, and one that is not serving in place.
    pub async fn operator(&self, name: &str, command: Operator) -> CommandResult {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Operator(name.to_string(), command, tx))
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        rx.await.map_err(|_| CommandError::ShuttingDown)?
    }

    /// Closes the doors (calls in flight finish within `shutdown_grace`),
    /// then stops every pattern (current, being replaced, being removed)
    /// and waits until all are gone. Safe to call more than once.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Task {
    supervisor: Supervisor,
    loaded: Loaded,
    data: DataPlane,
    closing: CancellationToken,
    config: watch::Sender<Arc<Config>>,
    doors: Option<Doors>,
}

impl Task {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(request) = requests.recv().await {
            match request {
                Request::Doors(doors) => self.doors = Some(*doors),
                Request::Reload(reply) => {
                    // The service manager sees the reload (systemd:
                    // RELOADING=1 … READY=1), applied or refused.
                    crate::notify::reloading();
                    let result = self.reload().await;
                    match &result {
                        Ok(applied) => {
                            info!(%applied, "configuration reloaded");
                            crate::notify::reloaded(&format!("serving; {applied}"));
                        }
                        Err(e) => {
                            warn!(error = %e, "reload refused");
                            crate::notify::reloaded("serving; the last reload was refused");
                        }
                    }
                    let _ = reply.send(result);
                }
                Request::Operator(name, command, reply) => {
                    let result = match command {
                        Operator::Restart => self.restart(&name).await,
                        Operator::Start | Operator::Stop => {
                            self.start_or_stop(&name, command).await
                        }
                    };
                    let _ = reply.send(result);
                }
                Request::Shutdown(reply) => {
                    // Later requests find the channel closed: ShuttingDown.
                    requests.close();
                    if let Some(doors) = self.doors.take() {
                        doors.close().await;
                    }
                    self.supervisor.shutdown().await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    async fn reload(&mut self) -> Result<Applied, ReloadError> {
        let new = self.loaded.reread().map_err(|e| ReloadError::Invalid {
            source_name: e.source_name,
            problems: e.problems,
        })?;
        let source_name = new.source.to_string();
        let mut problems = config::fixed_changes(&self.loaded.config, &new.config);
        problems.extend(
            self.supervisor
                .missing_commands(&new.config, &new.source)
                .into_iter()
                .map(|m| match m.split_once(": ") {
                    Some((field, message)) => Problem {
                        field: field.to_string(),
                        message: message.to_string(),
                    },
                    None => Problem {
                        field: "patterns".into(),
                        message: m,
                    },
                }),
        );
        // The access rules, token files read again (a rotated token takes
        // effect with the reload).
        let rules = match crate::access::Rules::of(&new.config) {
            Ok(rules) => Some(rules),
            Err(more) => {
                problems.extend(more);
                None
            }
        };
        if !problems.is_empty() {
            return Err(ReloadError::Invalid {
                source_name,
                problems,
            });
        }
        // New listeners are bound before anything else changes, so an
        // address in use refuses the reload with nothing to undo.
        let (old_listen, new_listen) = (&self.loaded.config.listen, &new.config.listen);
        let bound = if old_listen == new_listen {
            None
        } else if self.doors.is_none() {
            return Err(ReloadError::Invalid {
                source_name,
                problems: vec![Problem {
                    field: "listen".into(),
                    message: "the proxy is still opening its listeners; reload again in a moment"
                        .into(),
                }],
            });
        } else {
            let bound = Doors::bind(old_listen, new_listen)
                .await
                .map_err(|problems| ReloadError::Invalid {
                    source_name: source_name.clone(),
                    problems,
                })?;
            Some(bound)
        };

        let roster = self.supervisor.current();
        let mut applied = Applied {
            source: source_name,
            ..Applied::default()
        };
        // Start what is new, beside what runs: a process of a pattern that
        // already runs (a replacement, or a replica added or renamed) one
        // at a time, each SERVING before the next starts, so the pattern
        // keeps serving throughout and a new process that never serves
        // refuses the reload with nothing changed; a new pattern's
        // processes start as at boot (they may wait for their backend).
        let mut next = Vec::new();
        let mut fresh: Vec<PatternHandle> = Vec::new();
        let mut superseded: Vec<PatternHandle> = Vec::new();
        let mut failed = None;
        'patterns: for (i, p) in new.config.patterns.iter().enumerate() {
            let namespaces = supervisor::namespaces_of(&new.config, &p.name);
            let old = self
                .loaded
                .config
                .patterns
                .iter()
                .find(|o| o.name == p.name);
            let running = roster.replicas_of(&p.name);
            let keep = old.is_some_and(|o| o.same_process(p));
            for replica in p.replica_indices() {
                let current = running.iter().find(|h| h.replica() == replica);
                let name = p.replica_name(replica);
                if let (true, Some(h)) = (keep, current) {
                    applied.unchanged.push(name);
                    next.push(h.with_namespaces(namespaces.clone()));
                    continue;
                }
                let initial = match current {
                    Some(h) => Status::succeeding(&h.status(), RestartReason::Reload),
                    None => Status::new(),
                };
                let h =
                    self.supervisor
                        .spawn(i, p, replica, &new.source, namespaces.clone(), initial);
                fresh.push(h.clone());
                next.push(h.clone());
                match current {
                    Some(_) => applied.replaced.push(name),
                    None => applied.added.push(name),
                }
                if !running.is_empty()
                    && let Err(e) = self
                        .until_serving(&h, p.startup_timeout + HANDOVER_MARGIN)
                        .await
                {
                    failed = Some(e);
                    break 'patterns;
                }
            }
            // What runs and is not kept: replaced, or beyond the new count.
            superseded.extend(
                running
                    .into_iter()
                    .filter(|h| next.iter().all(|n| !n.same_owner(h))),
            );
        }
        if let Some(e) = failed {
            for h in fresh {
                self.supervisor.retire(h);
            }
            return Err(e);
        }
        // Removed: a pattern gone from the file, a replica beyond the new
        // count, a process renamed (one process ↔ replicas).
        let removed: Vec<PatternHandle> = roster
            .patterns()
            .iter()
            .filter(|h| new.config.patterns.iter().all(|p| p.name != h.pattern()))
            .cloned()
            .chain(superseded)
            .collect();
        applied.removed = removed
            .iter()
            .map(|h| h.name().to_string())
            .filter(|n| !applied.replaced.contains(n))
            .collect();

        // Switch: routes and policies for new calls, then everyone else.
        let telemetry = Arc::new(self.data.telemetry().with_patterns(labels(&new.config)));
        self.data.reconfigure(&new.config, &next, &telemetry);
        self.data.access().set(rules.flatten());
        self.supervisor.publish(Roster::new(next));
        // Drain and stop what was replaced or removed.
        for h in removed {
            self.supervisor.retire(h);
        }
        if let Some(doors) = &self.doors {
            doors.refresh_tls();
        }
        if let (Some(bound), Some(doors)) = (bound, self.doors.as_mut()) {
            let before = doors.addrs();
            if let Err(e) = doors.rebind(bound) {
                warn!(error = %e, "a re-bound listener has no address; the old one is closing");
            }
            let after = doors.addrs();
            for surface in crate::doors::Surface::ALL {
                let (was, now) = (before.get(surface), after.get(surface));
                if was != now {
                    applied.rebound.push(format!(
                        "{} {} → {}",
                        surface.field(),
                        crate::doors::Shown(was),
                        crate::doors::Shown(now)
                    ));
                }
            }
        }
        self.config.send_replace(Arc::new(new.config.clone()));
        self.loaded = new;
        Ok(applied)
    }

    /// `trellis patterns start|stop NAME`: the process of that name, or
    /// every replica of the pattern of that name, in order.
    async fn start_or_stop(&self, name: &str, command: Operator) -> CommandResult {
        let handles = self.supervisor.current().select(name);
        if handles.is_empty() {
            return Err(CommandError::NotFound(name.to_string()));
        }
        let mut said = Vec::new();
        for h in &handles {
            let r = match command {
                Operator::Start => h.start().await,
                _ => h.stop().await,
            };
            match r {
                Ok(m) => said.push(m),
                // A replica already running is no reason to refuse the rest.
                Err(CommandError::AlreadyRunning(_)) if handles.len() > 1 => {
                    said.push(format!("{} was already running", h.name()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(said.join("; "))
    }

    /// `trellis patterns restart NAME`. One process: blue/green when it
    /// serves, in place otherwise. Every replica of a pattern: rolling,
    /// one replica at a time, each new one SERVING before the old one
    /// drains and stops, so the pattern never has fewer replicas serving
    /// than before and never more than one extra process.
    async fn restart(&mut self, name: &str) -> CommandResult {
        let handles = self.supervisor.current().select(name);
        match handles.as_slice() {
            [] => Err(CommandError::NotFound(name.to_string())),
            [one] => {
                let Some(replaced) = self.replace(one).await? else {
                    return one.restart().await;
                };
                let (new_pid, old_pid) = replaced.pids();
                self.supervisor.retire(replaced.old);
                Ok(format!(
                    "pattern {name:?} replaced blue/green: pid {new_pid} serves its namespaces; \
                     pid {old_pid} drains and stops"
                ))
            }
            all => {
                let mut done = Vec::new();
                for h in all {
                    let step = match self.replace(h).await {
                        Ok(Some(replaced)) => {
                            let (new_pid, old_pid) = replaced.pids();
                            // Gone before the next replica's turn.
                            replaced.old.retire().await;
                            Ok(format!("{}: pid {old_pid} → {new_pid}", h.name()))
                        }
                        Ok(None) => h.restart().await.map(|_| {
                            format!("{}: restarted in place (it was not serving)", h.name())
                        }),
                        Err(e) => Err(e),
                    };
                    match step {
                        Ok(line) => done.push(line),
                        Err(e) => {
                            return Err(CommandError::NotReplaced(format!(
                                "rolling restart of {name:?} stopped at {}: {e}; done before it: {}",
                                h.name(),
                                if done.is_empty() {
                                    "none".into()
                                } else {
                                    done.join(", ")
                                }
                            )));
                        }
                    }
                }
                Ok(format!(
                    "pattern {name:?} restarted replica by replica: {}",
                    done.join(", ")
                ))
            }
        }
    }

    /// Replaces `old`'s process blue/green: a new one for the same replica
    /// starts beside it and takes its place in the routes once SERVING.
    /// `None` when `old` is not SERVING (nothing to hand over from) or its
    /// pattern is no longer configured; the caller restarts it in place.
    async fn replace(&mut self, old: &PatternHandle) -> Result<Option<Replaced>, CommandError> {
        let old_status = old.status();
        if old_status.state != State::Serving {
            return Ok(None);
        }
        let Some((i, p)) = self
            .loaded
            .config
            .patterns
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == old.pattern())
        else {
            return Ok(None);
        };
        let new = self.supervisor.spawn(
            i,
            p,
            old.replica(),
            &self.loaded.source,
            old.namespaces().to_vec(),
            Status::succeeding(&old_status, RestartReason::Operator),
        );
        let patience = p.startup_timeout + HANDOVER_MARGIN;
        if let Err(e) = self.until_serving(&new, patience).await {
            self.supervisor.retire(new);
            return Err(CommandError::NotReplaced(e.to_string()));
        }
        let next = self.supervisor.current().replacing(old.name(), new.clone());
        self.data.reroute(next.patterns());
        self.supervisor.publish(next);
        Ok(Some(Replaced {
            new,
            old: old.clone(),
            old_pid: old_status.pid.unwrap_or(0),
        }))
    }

    /// Waits for `h` to serve, giving up when the proxy starts stopping.
    async fn until_serving(
        &self,
        h: &PatternHandle,
        patience: std::time::Duration,
    ) -> Result<(), ReloadError> {
        tokio::select! {
            r = supervisor::serving(h, patience) => r.map_err(|why| ReloadError::NotServing {
                pattern: h.name().to_string(),
                why,
            }),
            _ = self.closing.cancelled() => Err(ReloadError::ShuttingDown),
        }
    }
}

/// How long past its `startup_timeout` a replacement may take to serve:
/// the owner itself acts at `startup_timeout`, and this only bounds the
/// wait for what it decided.
const HANDOVER_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// A process replaced blue/green: the new one serves, the old one is
/// out of the routes and still running.
struct Replaced {
    new: PatternHandle,
    old: PatternHandle,
    old_pid: u32,
}

impl Replaced {
    /// (new pid, old pid).
    fn pids(&self) -> (u32, u32) {
        (self.new.status().pid.unwrap_or(0), self.old_pid)
    }
}

/// Namespace → pattern, for the call log.
pub fn labels(config: &Config) -> HashMap<String, String> {
    config
        .namespaces
        .iter()
        .map(|n| (n.name.clone(), n.pattern.clone()))
        .collect()
}
