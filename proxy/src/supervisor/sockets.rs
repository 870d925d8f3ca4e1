//! Where patterns' Unix sockets live: a directory of this proxy run's own,
//! that only the proxy's user can enter, so no other user's process can
//! even reach a pattern's socket (go-plugin keeps its sockets in a private
//! temporary directory the same way).
//!
//! ```text
//! <socket_dir>/                       shared by runs (0700 when created here)
//!     trellis-<pid>-<start time>/     one per proxy process, mode 0700, new
//!         <pattern>-<n>.sock          one per pattern process
//! ```
//!
//! The run's directory is created on the first Unix-socket start, with
//! `mkdir` (never an existing one), and removed when the proxy stops. A
//! SIGKILLed proxy's directory cannot block a new proxy (its name holds
//! another pid and start time); a new run removes the directories of
//! proxies that are gone, as `cgroup.rs` does for cgroups. Each process of
//! a pattern gets a socket of its own (`-<n>`), so a blue/green restart's
//! new process never meets the old one's socket.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info};

use super::cgroup::{parse_proxy_dir, proxy_dir_name, start_time};

/// The longest socket path the kernel takes (`sun_path` is 108 bytes,
/// with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// This proxy's socket directory, made on first use.
#[derive(Debug)]
pub struct Sockets {
    /// `socket_dir` (configured, or the host's default).
    base: PathBuf,
    /// `<base>/trellis-<pid>-<start>`, or why it could not be made.
    dir: OnceLock<Result<PathBuf, String>>,
    next: AtomicU64,
}

impl Sockets {
    pub fn new(base: PathBuf) -> Sockets {
        Sockets {
            base,
            dir: OnceLock::new(),
            next: AtomicU64::new(0),
        }
    }

    /// The run's directory, created (mode 0700, owned by this user) on the
    /// first call.
    pub fn dir(&self) -> Result<&Path, String> {
        self.dir
            .get_or_init(|| create(&self.base))
            .as_deref()
            .map_err(Clone::clone)
    }

    /// A socket path for a new process of `pattern`, inside [`Self::dir`].
    pub fn socket(&self, pattern: &str) -> Result<PathBuf, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir()?.join(format!("{pattern}-{n}.sock"));
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(format!(
                "the socket path {} is {len} bytes, more than a Unix socket address holds \
                 ({MAX_SOCKET_PATH}); set `socket_dir` to a shorter folder or give the pattern \
                 a shorter name",
                path.display()
            ));
        }
        Ok(path)
    }

    /// Removes the run's directory and whatever is left in it (every
    /// pattern has stopped by now). Safe to call twice.
    pub fn remove(&self) {
        if let Some(Ok(dir)) = self.dir.get() {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => debug!(dir = %dir.display(), "socket directory removed"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    info!(dir = %dir.display(), error = %e, "cannot remove the socket directory")
                }
            }
        }
    }
}

impl Drop for Sockets {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Makes `<base>/trellis-<pid>-<start>` (mode 0700), after checking that
/// `base` belongs to this user or root, and removes what proxies that are
/// gone left in `base`.
fn create(base: &Path) -> Result<PathBuf, String> {
    let in_base = |what: &str, e: io::Error| {
        format!(
            "cannot {what} the socket folder {}: {e}; set `socket_dir` to a folder this \
             proxy's user can write",
            base.display()
        )
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)
        .map_err(|e| in_base("create", e))?;
    let meta = std::fs::metadata(base).map_err(|e| in_base("read", e))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "the socket folder {} belongs to uid {}, not to this proxy's user (uid {me}) nor \
             root: its owner could replace the patterns' sockets; set `socket_dir` to a folder \
             of this user's own",
            base.display(),
            meta.uid()
        ));
    }
    sweep_stale(base);
    let pid = std::process::id();
    let start =
        start_time(pid).ok_or("cannot read this process's start time from /proc/self/stat")?;
    let dir = base.join(proxy_dir_name(pid, start));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create the socket folder {}: {e}", dir.display()))?;
    // The umask can only have removed bits; say exactly what is meant.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot make {} private (mode 0700): {e}", dir.display()))?;
    info!(dir = %dir.display(), "patterns' sockets live in a private folder");
    Ok(dir)
}

/// Removes the run directories in `base` whose proxy is gone.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let Some((pid, start)) = entry.file_name().to_str().and_then(parse_proxy_dir) else {
            continue;
        };
        if start_time(pid) == Some(start) {
            continue; // its proxy is running
        }
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) && std::fs::remove_dir_all(&path).is_ok() {
            info!(dir = %path.display(), "removed the socket folder of a proxy that is gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_directory_is_private_fresh_and_removed() {
        let base = tempfile::tempdir().unwrap();
        let sockets = Sockets::new(base.path().join("s"));
        let a = sockets.socket("mem").unwrap();
        let b = sockets.socket("mem").unwrap();
        assert_ne!(a, b, "each process gets a socket of its own");
        let dir = sockets.dir().unwrap().to_path_buf();
        assert_eq!(a.parent(), Some(dir.as_path()));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        sockets.remove();
        assert!(!dir.exists());
        sockets.remove();
    }

    #[test]
    fn a_gone_proxys_directory_is_swept_and_a_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        // pid 0 with start 1 is no process.
        let stale = base.path().join(proxy_dir_name(0, 1));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("mem-0.sock"), "").unwrap();
        let me = std::process::id();
        // Another live process (this one, but a directory name it does not
        // use) stands for a running proxy.
        let parent = std::os::unix::process::parent_id();
        let live = base
            .path()
            .join(proxy_dir_name(parent, start_time(parent).unwrap()));
        std::fs::create_dir(&live).unwrap();
        let sockets = Sockets::new(base.path().to_path_buf());
        let dir = sockets.dir().unwrap();
        assert!(!stale.exists());
        assert!(live.exists());
        assert_eq!(
            dir,
            base.path()
                .join(proxy_dir_name(me, start_time(me).unwrap()))
        );
    }

    #[test]
    fn a_socket_path_too_long_for_the_kernel_names_the_setting() {
        let base = tempfile::tempdir().unwrap();
        let sockets = Sockets::new(base.path().join("d".repeat(90)));
        let err = sockets.socket("mem").unwrap_err();
        assert!(err.contains("socket_dir"), "{err}");
    }
}
