//! Each pattern process in a cgroup of its own (cgroup v2), so that its
//! whole tree — grandchildren that left its process group, daemons it
//! started — dies with it: a stop writes `cgroup.kill`, and a proxy that
//! starts finds and kills what a SIGKILLed proxy left behind (the parent
//! death signal reaches a pattern, not the processes it forked).
//!
//! Layout, under the proxy's own cgroup (with systemd, the unit's, which
//! `Delegate=yes` hands to the proxy):
//!
//! ```text
//! <own cgroup>/trellis-<pid>-<start time>/   one per proxy process
//!     <pattern>-<n>/                         one per pattern process
//! ```
//!
//! The proxy's pid and start time name its directory, so a proxy that
//! starts can tell a directory whose proxy is gone (kill it, remove it)
//! from one of another proxy still running in the same cgroup. No
//! controller is enabled: only `cgroup.kill` and membership are used, so
//! the proxy may stay in its own cgroup beside the directory.
//!
//! Where the proxy cannot create cgroups (cgroup v1 only, no write access,
//! a kernel older than 5.14 without `cgroup.kill`), patterns run as before
//! — a process group each, killed as a group — and the log says so once.
//!
//! This module and `process` are the only code that signals processes
//! (`cgroup.kill` is a signal to every member).

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{debug, info, warn};

/// The cgroups of this proxy's patterns.
#[derive(Debug)]
pub struct Cgroups {
    /// `<own cgroup>/trellis-<pid>-<start>`.
    root: PathBuf,
    next: AtomicU64,
}

/// How long a removal waits for a killed cgroup to empty.
const EMPTY_PATIENCE: Duration = Duration::from_secs(5);

impl Cgroups {
    /// This proxy's cgroup directory, created; `None` (said once in the
    /// log, with why) where cgroups cannot be used.
    pub fn detect() -> Option<Cgroups> {
        match Self::create() {
            Ok(c) => {
                info!(cgroup = %c.root.display(), "each pattern runs in a cgroup of its own");
                Some(c)
            }
            Err(why) => {
                info!(
                    "patterns run without a cgroup of their own ({why}): a pattern's process group \
                     is killed with it, but processes it moved out of its group can outlive a \
                     SIGKILLed proxy; give the proxy a delegated cgroup v2 (systemd: Delegate=yes)"
                );
                None
            }
        }
    }

    fn create() -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup v2 hierarchy is mounted")?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_cgroup(&own).ok_or("this process has no cgroup v2 path")?;
        let base = mount.join(own.trim_start_matches('/'));
        let start = start_time(std::process::id())
            .ok_or("cannot read this process's start time from /proc/self/stat")?;
        let root = base.join(proxy_dir_name(std::process::id(), start));
        std::fs::create_dir(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        if !root.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&root);
            return Err("the kernel has no cgroup.kill (Linux 5.14+)".into());
        }
        Ok(Cgroups {
            root,
            next: AtomicU64::new(0),
        })
    }

    /// Kills and removes the directories of proxies that are gone (left
    /// by a SIGKILL), in the background.
    pub fn sweep_stale(&self) {
        let Some(base) = self.root.parent().map(Path::to_path_buf) else {
            return;
        };
        let own = self.root.clone();
        tokio::spawn(async move {
            let Ok(entries) = std::fs::read_dir(&base) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path == own {
                    continue;
                }
                let Some((pid, start)) = entry.file_name().to_str().and_then(parse_proxy_dir)
                else {
                    continue;
                };
                if start_time(pid) == Some(start) {
                    continue; // its proxy is running
                }
                info!(cgroup = %path.display(), "killing what a proxy that is gone left running");
                remove_tree(&path).await;
            }
        });
    }

    /// A new, empty cgroup for one process of `pattern`.
    pub fn leaf(&self, pattern: &str) -> io::Result<Leaf> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(format!("{pattern}-{n}"));
        std::fs::create_dir(&dir)?;
        let procs = CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|_| io::Error::other("a cgroup path with a NUL byte"))?;
        Ok(Leaf { dir, procs })
    }

    /// Removes this proxy's directory (every pattern stopped by now).
    pub async fn remove(&self) {
        remove_tree(&self.root).await;
    }
}

/// The cgroup of one pattern process. Dropped, it kills whatever is
/// still in it and removes itself.
#[derive(Debug)]
pub struct Leaf {
    dir: PathBuf,
    /// `<dir>/cgroup.procs`, ready for the forked child (no allocation
    /// between fork and exec).
    procs: CString,
}

impl Leaf {
    /// `cgroup.procs`, for [`enter`] in the forked child.
    pub fn procs(&self) -> CString {
        self.procs.clone()
    }

    /// Whether `pid` is in this cgroup.
    pub fn holds(&self, pid: u32) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().any(|l| l.trim() == pid.to_string()))
            .unwrap_or(false)
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        kill(&self.dir);
        if std::fs::remove_dir(&self.dir).is_ok() {
            return;
        }
        // Its members are still exiting: remove it once they are gone.
        let dir = self.dir.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { remove_tree(&dir).await });
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs`. For the forked child before exec: only async-signal-safe
/// calls (open, write, close), no allocation. A failure leaves the child
/// where it was (the parent sees it with [`Leaf::holds`]).
pub fn enter(procs: &std::ffi::CStr) {
    // SAFETY: plain system calls on a NUL-terminated path and a static
    // buffer; no allocation, no lock.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            let _ = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// `cgroup.kill`: SIGKILL to every process in `dir` and below.
fn kill(dir: &Path) {
    match std::fs::write(dir.join("cgroup.kill"), "1") {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(cgroup = %dir.display(), error = %e, "cgroup.kill failed"),
    }
}

/// Kills everything in `dir`, then removes it and its sub-cgroups,
/// deepest first, waiting for them to empty.
async fn remove_tree(dir: &Path) {
    kill(dir);
    let deadline = tokio::time::Instant::now() + EMPTY_PATIENCE;
    loop {
        let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        children.retain(|c| std::fs::remove_dir(c).is_err());
        if children.is_empty() {
            match std::fs::remove_dir(dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            debug!(cgroup = %dir.display(), "not empty yet; left for the next proxy to remove");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (the mount point is field 5; the type follows the ` - ` separator).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        before.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// This process's cgroup v2 path (`0::<path>` in `/proc/self/cgroup`).
fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// A process's start time (clock ticks since boot; field 22 of
/// `/proc/<pid>/stat`), which with the pid names one process for good.
pub(super) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start
    // after the last ')'. Field 22 is the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub(super) fn proxy_dir_name(pid: u32, start: u64) -> String {
    format!("trellis-{pid}-{start}")
}

pub(super) fn parse_proxy_dir(name: &str) -> Option<(u32, u64)> {
    let (pid, start) = name.strip_prefix("trellis-")?.split_once('-')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_hybrid_and_unified_layouts() {
        let hybrid = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw"), None);
    }

    #[test]
    fn the_own_path_is_the_unified_line() {
        let lines = "4:memory:/x\n0::/system.slice/trellis.service\n";
        assert_eq!(own_cgroup(lines), Some("/system.slice/trellis.service"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn proxy_directories_name_one_process_for_good() {
        let me = std::process::id();
        let start = start_time(me).expect("our own start time");
        let name = proxy_dir_name(me, start);
        assert_eq!(parse_proxy_dir(&name), Some((me, start)));
        assert_eq!(parse_proxy_dir("trellis-x-1"), None);
        assert_eq!(parse_proxy_dir("mem-0"), None);
    }
}
