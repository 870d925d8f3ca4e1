//! Spawning, signalling and reaping one pattern process. Only the supervisor
//! calls into this module; nothing else in the proxy signals processes.
//!
//! Each child runs in a process group of its own (so a signal reaches the
//! pattern and anything it forked) and, on Linux, with
//! `PR_SET_PDEATHSIG=SIGKILL` (so it dies with the proxy even when the proxy
//! is SIGKILLed). The death signal fires when the *thread* that forked the
//! child exits, so children are spawned from tokio worker threads (which live
//! as long as the runtime), never from `spawn_blocking` threads.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How a pattern process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            // Neither happens for a reaped child on Unix.
            (None, None) => Exit::Code(-1),
        }
    }

    /// A clean exit (code 0) is not a failure; anything else is.
    pub fn is_failure(self) -> bool {
        self != Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => match Signal::try_from(s) {
                Ok(sig) => write!(f, "signal {s} ({})", sig.as_str()),
                Err(_) => write!(f, "signal {s}"),
            },
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub program: &'a Path,
    pub args: &'a [String],
    /// Added to the proxy's environment (from which `TRELLIS_*` and the
    /// service manager's `NOTIFY_SOCKET`, `WATCHDOG_*` are removed).
    pub env: &'a BTreeMap<String, String>,
    /// RLIMIT_NOFILE for the child, if set.
    pub open_files: Option<u64>,
    /// RLIMIT_AS (bytes) for the child, if set.
    pub address_space: Option<u64>,
    /// The cgroup the child enters before exec (`cgroup.procs`), if any.
    pub cgroup: Option<std::ffi::CString>,
}

/// Starts the child with piped stdout/stderr, stdin from /dev/null, its own
/// process group and a parent-death signal.
pub fn spawn(spec: &Spec<'_>) -> std::io::Result<Child> {
    let mut cmd = Command::new(spec.program);
    cmd.args(spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TRELLIS_") {
            cmd.env_remove(key);
        }
    }
    // The service manager's variables are the proxy's alone: a pattern
    // must not send READY=1 or WATCHDOG=1 on its behalf.
    for key in crate::notify::MANAGER_VARIABLES {
        cmd.env_remove(key);
    }
    cmd.envs(spec.env);
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{Resource, setrlimit};
        let parent = nix::unistd::getpid();
        let (open_files, address_space) = (spec.open_files, spec.address_space);
        let cgroup = spec.cgroup.clone();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls (open/write/close of
        // cgroup.procs, setrlimit, prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                // First, so whatever the child forks is in it too.
                if let Some(procs) = &cgroup {
                    super::cgroup::enter(procs);
                }
                if let Some(n) = open_files {
                    setrlimit(Resource::RLIMIT_NOFILE, n, n)?;
                }
                if let Some(n) = address_space {
                    setrlimit(Resource::RLIMIT_AS, n, n)?;
                }
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died between fork and prctl.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("the proxy exited during spawn"));
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Sends `signal` to the whole process group led by `pid`. A group that is
/// already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pid, %signal, error = %e, "could not signal process group"),
    }
}

/// Waits up to `limit` for the child to exit.
pub async fn wait_for(child: &mut Child, limit: Duration) -> Option<Exit> {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => Some(Exit::from_status(status)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "waiting for a pattern process failed");
            None
        }
        Err(_) => None,
    }
}

/// SIGTERM to the group, up to `grace` to exit, then SIGKILL and reap. Also
/// SIGKILLs whatever is left of the group once the leader is gone, so no
/// grandchild outlives its pattern. Returns how the leader ended.
pub async fn terminate(child: &mut Child, pid: u32, grace: Duration) -> Exit {
    if let Ok(Some(status)) = child.try_wait() {
        signal_group(pid, Signal::SIGKILL);
        return Exit::from_status(status);
    }
    signal_group(pid, Signal::SIGTERM);
    if let Some(exit) = wait_for(child, grace).await {
        signal_group(pid, Signal::SIGKILL);
        return exit;
    }
    tracing::warn!(pid, grace = ?grace, "pattern ignored SIGTERM; sending SIGKILL");
    kill(child, pid).await
}

/// Resident memory of `pid` in bytes, from /proc/<pid>/status (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// SIGKILL to the group and reap the leader.
pub async fn kill(child: &mut Child, pid: u32) -> Exit {
    signal_group(pid, Signal::SIGKILL);
    match child.wait().await {
        Ok(status) => Exit::from_status(status),
        Err(e) => {
            tracing::warn!(pid, error = %e, "reaping a killed pattern failed");
            Exit::Signal(Signal::SIGKILL as i32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Child {
        let args = vec!["-c".to_string(), script.to_string()];
        let env = BTreeMap::new();
        spawn(&Spec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            open_files: None,
            address_space: None,
            cgroup: None,
        })
        .expect("spawn /bin/sh")
    }

    #[tokio::test]
    async fn rlimits_apply_to_the_child() {
        let args = vec!["-c".to_string(), "ulimit -n".to_string()];
        let env = BTreeMap::new();
        let child = spawn(&Spec {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            open_files: Some(37),
            address_space: None,
            cgroup: None,
        })
        .unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "37");
    }

    #[test]
    fn rss_of_this_process_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn exit_display_names_the_signal() {
        assert_eq!(Exit::Code(3).to_string(), "exit code 3");
        assert_eq!(Exit::Signal(9).to_string(), "signal 9 (SIGKILL)");
        assert!(!Exit::Code(0).is_failure());
        assert!(Exit::Signal(15).is_failure());
    }

    #[tokio::test]
    async fn exit_code_is_recorded() {
        let mut c = sh("exit 7");
        assert_eq!(
            wait_for(&mut c, Duration::from_secs(30)).await,
            Some(Exit::Code(7))
        );
    }

    #[tokio::test]
    async fn terminate_escalates_to_sigkill_when_sigterm_is_ignored() {
        // The shell ignores TERM and tells us once the trap is set.
        let mut c = sh("trap '' TERM; echo ready; while :; do sleep 1; done");
        let pid = c.id().unwrap();
        let mut out = tokio::io::BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
            .await
            .unwrap();
        assert_eq!(line.trim(), "ready");
        let exit = terminate(&mut c, pid, Duration::from_millis(100)).await;
        assert_eq!(exit, Exit::Signal(9));
    }

    #[tokio::test]
    async fn terminate_kills_the_whole_group() {
        // The child forks a grandchild in the same group and reports its pid.
        let mut c = sh("sleep 1000 & echo $!; wait");
        let pid = c.id().unwrap();
        let mut out = tokio::io::BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
            .await
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        terminate(&mut c, pid, Duration::from_secs(5)).await;
        // The grandchild is not our child, so it is reaped by init; wait
        // until it is gone (kill(pid, 0) fails) rather than sleeping a fixed
        // time. It was signalled, so this ends promptly.
        let gone = async {
            while nix::sys::signal::kill(Pid::from_raw(grandchild), None).is_ok() {
                let state =
                    std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
                if state.contains(") Z") {
                    break; // a zombie waiting for init: dead
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), gone)
            .await
            .expect("grandchild gone");
    }

    #[tokio::test]
    async fn terminate_of_an_exited_child_is_harmless() {
        let mut c = sh("exit 0");
        let pid = c.id().unwrap();
        assert_eq!(
            wait_for(&mut c, Duration::from_secs(30)).await,
            Some(Exit::Code(0))
        );
        assert_eq!(
            terminate(&mut c, pid, Duration::from_secs(1)).await,
            Exit::Code(0)
        );
    }
}
