//! Supervision: one owner task per pattern process.
//!
//! - `process`: spawn, signal, reap (the only code that signals processes).
//! - `handshake`: the pattern's start-up line.
//! - `output`: the pattern's stdout/stderr → logs and a stderr tail.
//! - `backoff`: restart delays and the crash-loop breaker.
//! - `state`: the state machine's states and the published status.
//! - `handle`: [`PatternHandle`], what everyone but the owner holds.
//! - `pattern`: the owner task (one process's life, commands, stop).
//! - `startup`: bringing a process up, within `startup_timeout`.
//! - `probe`: health checks and the health poller.
//! - `ports`, `sockets`, `cgroup`: where a pattern listens (a Unix socket
//!   in the run's private folder by default); its cgroup.
//! - `secret`: the per-start secret every call to a pattern carries.
//!
//! [`Supervisor`] holds the set of patterns running now (the [`Roster`]),
//! published on a `watch` channel: health, the admin API, metrics and the
//! data plane's routes all read the same snapshot, and a reload or a
//! blue/green restart replaces it whole.

pub mod backoff;
pub mod cgroup;
pub mod handle;
pub mod handshake;
pub mod output;
pub mod pattern;
pub mod ports;
mod probe;
pub mod process;
pub mod secret;
pub mod sockets;
mod startup;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, Config, Host, Loaded, PatternConfig, Source, Traces};
pub use handle::{CommandError, CommandResult, PatternHandle};
pub use state::{Event, RestartReason, Restarts, State, Status};

/// The patterns the proxy runs now, in configuration order, each handle
/// carrying the namespaces it serves. Replaced whole, never edited.
#[derive(Clone, Debug, Default)]
pub struct Roster {
    patterns: Vec<PatternHandle>,
}

impl Roster {
    pub fn new(patterns: Vec<PatternHandle>) -> Self {
        Roster { patterns }
    }

    pub fn patterns(&self) -> &[PatternHandle] {
        &self.patterns
    }

    /// The process named `name` (a pattern's only one, or a replica).
    pub fn get(&self, name: &str) -> Option<&PatternHandle> {
        self.patterns.iter().find(|p| p.name() == name)
    }

    /// The processes `name` means: the process of that name, else every
    /// replica of the pattern of that name (in replica order); empty when
    /// neither exists.
    pub fn select(&self, name: &str) -> Vec<PatternHandle> {
        match self.get(name) {
            Some(h) => vec![h.clone()],
            None => self.replicas_of(name),
        }
    }

    /// Every process of pattern `pattern`, in replica order.
    pub fn replicas_of(&self, pattern: &str) -> Vec<PatternHandle> {
        let mut all: Vec<PatternHandle> = self
            .patterns
            .iter()
            .filter(|p| p.pattern() == pattern)
            .cloned()
            .collect();
        all.sort_by_key(|p| p.replica());
        all
    }

    /// This roster with `name`'s handle replaced by `handle`.
    pub fn replacing(&self, name: &str, handle: PatternHandle) -> Roster {
        Roster {
            patterns: self
                .patterns
                .iter()
                .map(|p| {
                    if p.name() == name {
                        handle.clone()
                    } else {
                        p.clone()
                    }
                })
                .collect(),
        }
    }
}

/// What every spawn needs besides the pattern's own configuration; fixed
/// for the proxy's life (a reload cannot change it).
struct Spawner {
    /// The run's private socket folder (made on the first unix start).
    sockets: Arc<sockets::Sockets>,
    exe_dir: Option<PathBuf>,
    path_var: Option<std::ffi::OsString>,
    traces: Traces,
    cgroups: Option<Arc<cgroup::Cgroups>>,
}

impl Spawner {
    fn new(config: &Config, host: &Host) -> Self {
        Spawner {
            sockets: Arc::new(sockets::Sockets::new(
                config
                    .socket_dir
                    .clone()
                    .unwrap_or_else(|| host.default_socket_dir()),
            )),
            exe_dir: host.exe_dir.clone(),
            path_var: host.path.clone(),
            traces: config.telemetry.traces.clone(),
            cgroups: None,
        }
    }

    fn resolve(&self, index: usize, command: &str, source: &Source) -> Result<PathBuf, String> {
        config::resolve_command(
            command,
            source.dir(),
            self.exe_dir.as_deref(),
            self.path_var.as_deref(),
        )
        .map_err(|searched| missing_command(index, command, &searched))
    }

    fn spawn(
        &self,
        index: usize,
        p: &PatternConfig,
        replica: Option<u32>,
        source: &Source,
        namespaces: Vec<String>,
        initial: Status,
    ) -> (PatternHandle, JoinHandle<()>) {
        let program = self.resolve(index, &p.command, source);
        let mut p = p.clone();
        // Traces continue into the pattern: it exports where the proxy
        // does, under its own name (its `env:` entries win).
        for (k, v) in self.traces.pattern_env(&p.name) {
            p.env.entry(k).or_insert(v);
        }
        pattern::spawn(
            p,
            replica,
            program,
            namespaces,
            Arc::clone(&self.sockets),
            initial,
            self.cgroups.clone(),
        )
    }
}

/// The namespaces `config` routes to `pattern`.
pub fn namespaces_of(config: &Config, pattern: &str) -> Vec<String> {
    config
        .namespaces
        .iter()
        .filter(|n| n.pattern == pattern)
        .map(|n| n.name.clone())
        .collect()
}

/// Every supervised pattern: the current [`Roster`], and every owner task
/// ever spawned until it ends (so a pattern being replaced or removed is
/// still waited for at shutdown).
pub struct Supervisor {
    spawner: Spawner,
    roster: watch::Sender<Arc<Roster>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Supervisor {
    /// Spawns an owner task per pattern. Must be called inside the tokio
    /// runtime (children are forked from its worker threads).
    pub fn start(loaded: &Loaded) -> Self {
        let (config, source) = (&loaded.config, &loaded.source);
        let mut spawner = Spawner::new(config, &loaded.host);
        spawner.cgroups = cgroup::Cgroups::detect().map(Arc::new);
        if let Some(c) = &spawner.cgroups {
            c.sweep_stale();
        }
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for (i, p) in config.patterns.iter().enumerate() {
            for replica in p.replica_indices() {
                let namespaces = namespaces_of(config, &p.name);
                let (handle, task) =
                    spawner.spawn(i, p, replica, source, namespaces, Status::new());
                handles.push(handle);
                tasks.push(task);
            }
        }
        let (roster, _) = watch::channel(Arc::new(Roster::new(handles)));
        Supervisor {
            spawner,
            roster,
            tasks,
        }
    }

    /// The roster now, and every later one.
    pub fn roster(&self) -> watch::Receiver<Arc<Roster>> {
        self.roster.subscribe()
    }

    pub fn current(&self) -> Arc<Roster> {
        self.roster.borrow().clone()
    }

    /// Every pattern of `config` whose command does not resolve, as
    /// `patterns[i].command` problems.
    pub fn missing_commands(&self, config: &Config, source: &Source) -> Vec<String> {
        missing_commands(config, source, &self.spawner)
    }

    /// Starts a new owner task for replica `replica` of `p` (not yet in
    /// the roster).
    pub fn spawn(
        &mut self,
        index: usize,
        p: &PatternConfig,
        replica: Option<u32>,
        source: &Source,
        namespaces: Vec<String>,
        initial: Status,
    ) -> PatternHandle {
        self.tasks.retain(|t| !t.is_finished());
        let (handle, task) = self
            .spawner
            .spawn(index, p, replica, source, namespaces, initial);
        self.tasks.push(task);
        handle
    }

    /// Makes `roster` the current one.
    pub fn publish(&self, roster: Roster) {
        self.roster.send_replace(Arc::new(roster));
    }

    /// Drains and stops `handle`'s pattern in the background; shutdown
    /// still waits for it.
    pub fn retire(&mut self, handle: PatternHandle) {
        self.tasks
            .push(tokio::spawn(async move { handle.retire().await }));
    }

    /// Stops every pattern concurrently and waits for each owner task to end.
    pub async fn shutdown(self) {
        let roster = self.current();
        join_all(roster.patterns().iter().map(|h| h.shutdown())).await;
        join_all(self.tasks).await;
        if let Some(c) = &self.spawner.cgroups {
            c.remove().await;
        }
        self.spawner.sockets.remove();
    }
}

/// Waits until `handle`'s pattern is SERVING, for at most `patience`; the
/// error says what it did instead.
pub async fn serving(handle: &PatternHandle, patience: Duration) -> Result<(), String> {
    let mut status = handle.watch();
    let wait = status.wait_for(|s| matches!(s.state, State::Serving | State::Failed));
    match tokio::time::timeout(patience, wait).await {
        Ok(Ok(s)) if s.state == State::Serving => Ok(()),
        Ok(Ok(s)) => Err(format!(
            "it FAILED: {}",
            s.last_error.as_deref().unwrap_or("no reason given")
        )),
        Ok(Err(_)) => Err("its supervisor ended".into()),
        Err(_) => {
            let s = handle.status();
            Err(format!(
                "it was not SERVING within {} (state {}{})",
                humantime::format_duration(patience),
                s.state,
                s.last_error.map(|e| format!(": {e}")).unwrap_or_default()
            ))
        }
    }
}

/// `check-config` and reload: every pattern's command must resolve.
pub fn check_commands(loaded: &Loaded) -> Vec<String> {
    missing_commands(
        &loaded.config,
        &loaded.source,
        &Spawner::new(&loaded.config, &loaded.host),
    )
}

fn missing_commands(config: &Config, source: &Source, spawner: &Spawner) -> Vec<String> {
    config
        .patterns
        .iter()
        .enumerate()
        .filter_map(|(i, p)| spawner.resolve(i, &p.command, source).err())
        .collect()
}

/// The error for a command that was not found, listing where it was looked for.
pub fn missing_command(index: usize, command: &str, searched: &[std::path::PathBuf]) -> String {
    let places: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
    format!(
        "patterns[{index}].command: executable {command:?} not found (looked for {}); build it \
         (`cargo build --workspace`), install it on PATH, or give a path",
        if places.is_empty() {
            "nowhere".to_string()
        } else {
            places.join(", ")
        }
    )
}
