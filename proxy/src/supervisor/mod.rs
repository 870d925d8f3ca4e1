//! Supervision: one owner task per pattern process.
//!
//! - `process`: spawn, signal, reap (the only code that signals processes).
//! - `handshake`: the pattern's start-up line.
//! - `output`: the pattern's stdout/stderr → logs and a stderr tail.
//! - `backoff`: restart delays and the crash-loop breaker.
//! - `state`: the state machine's states and the published status.
//! - `pattern`: the owner task and [`PatternHandle`].

pub mod backoff;
pub mod handshake;
pub mod output;
pub mod pattern;
pub mod ports;
pub mod process;
pub mod state;

use std::path::Path;

use futures::future::join_all;

use crate::config::{self, Config, Source};
pub use pattern::{CommandError, CommandResult, PatternHandle};
pub use state::{Event, RestartReason, Restarts, State, Status};

/// Every supervised pattern. Built from the configuration; starts all
/// patterns at once.
pub struct Supervisor {
    handles: Vec<PatternHandle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Supervisor {
    /// Spawns an owner task per pattern. Must be called inside the tokio
    /// runtime (children are forked from its worker threads).
    pub fn start(config: &Config, source: &Source) -> Self {
        let socket_dir = config.socket_dir.clone().unwrap_or_else(default_socket_dir);
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let path_var = std::env::var_os("PATH");
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for (i, p) in config.patterns.iter().enumerate() {
            let program = config::resolve_command(
                &p.command,
                source.dir(),
                exe_dir.as_deref(),
                path_var.as_deref(),
            )
            .map_err(|searched| missing_command(i, &p.command, &searched));
            let namespaces = config
                .namespaces
                .iter()
                .filter(|n| n.pattern == p.name)
                .map(|n| n.name.clone())
                .collect();
            let mut p = p.clone();
            // Traces continue into the pattern: it exports where the proxy
            // does, under its own name (its `env:` entries win).
            for (k, v) in config.telemetry.traces.pattern_env(&p.name) {
                p.env.entry(k).or_insert(v);
            }
            let (handle, task) = pattern::spawn(p, program, namespaces, socket_dir.clone());
            handles.push(handle);
            tasks.push(task);
        }
        Supervisor { handles, tasks }
    }

    pub fn handles(&self) -> &[PatternHandle] {
        &self.handles
    }

    /// Stops every pattern concurrently and waits for each owner task to end.
    pub async fn shutdown(self) {
        join_all(self.handles.iter().map(|h| h.shutdown())).await;
        join_all(self.tasks).await;
    }
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

/// `$XDG_RUNTIME_DIR/trellis`, or `/tmp/trellis-<uid>`.
pub fn default_socket_dir() -> std::path::PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => std::path::PathBuf::from(d).join("trellis"),
        None => std::env::temp_dir().join(format!("trellis-{}", nix::unistd::getuid())),
    }
}
