//! A private `nats-server` for tests: on a free loopback port, started,
//! SIGKILLed and restarted on the same port by the test. Nothing here
//! touches a server the machine itself runs. A missing `nats-server` fails
//! the test with what to install: tests never skip a backend silently.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::{PATIENCE, PatternEntry, bin, eventually};

/// `nats-server` from `PATH` or the usual system directories (Debian puts it
/// in /usr/sbin, often not on a user's `PATH`).
pub fn nats_server_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from));
    for dir in &dirs {
        let p = dir.join("nats-server");
        if std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return p;
        }
    }
    panic!(
        "nats-server was not found on PATH or in /usr/sbin, /usr/bin, /usr/local/bin; run \
         `make setup` (as root it installs it with apt-get), or install the Debian/Ubuntu \
         package `nats-server` yourself"
    );
}

/// A `nats-server` of the test's own. Killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it greets a
    /// client.
    pub async fn start() -> NatsServer {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            l.local_addr().expect("local addr").port()
        };
        let mut server = NatsServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log = self.dir.path().join("nats-server.log");
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-l"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let port = self.port;
        let ready = tokio::time::timeout(PATIENCE, async {
            eventually("nats-server to greet a client", || greets(port)).await
        })
        .await;
        if ready.is_err() {
            panic!(
                "nats-server on port {port} never became ready; its log:\n{}",
                self.log()
            );
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL, and wait until it is gone: no goodbye to its clients, the
    /// kernel just closes their connections.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL nats-server");
            tokio::time::timeout(PATIENCE, child.wait())
                .await
                .expect("nats-server exits after SIGKILL")
                .expect("wait for nats-server");
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }
}

/// Does a NATS server on `port` answer a new connection with its INFO line?
async fn greets(port: u16) -> Option<()> {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    (&buf == b"INFO ").then_some(())
}

/// A `trellis-nats` pattern entry serving `namespaces` from the server at
/// `url`, with a short connect timeout so tests see outages quickly.
pub fn nats_pattern(name: &str, namespaces: &[&str], url: &str) -> PatternEntry {
    PatternEntry {
        name: name.into(),
        command: bin("trellis-nats"),
        args: vec![],
        namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        extra: String::new(),
        config: format!("url: {url:?}\nconnect_timeout: 2s\n"),
    }
}
