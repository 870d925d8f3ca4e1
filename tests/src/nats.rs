//! A private `nats-server` for tests: on a free loopback port, started,
//! SIGKILLed and restarted on the same port by the test. Nothing here
//! touches a server the machine itself runs. A missing `nats-server` fails
//! the test with what to install (see `backends::find_binary`): tests never
//! skip a backend silently.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::backends::{find_binary, free_port};
use crate::{PATIENCE, PatternEntry, bin, eventually};

/// A `nats-server` of the test's own. Killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// A config file (TLS, authorization), when there is one.
    config: Option<std::path::PathBuf>,
}

impl NatsServer {
    /// Starts a server on a free loopback port (below the ephemeral range,
    /// so it is still free for a restart) and waits until it greets a client.
    pub async fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            config: None,
        };
        server.spawn().await;
        server
    }

    /// One that requires TLS, with `cert_file`/`key_file` as its
    /// certificate, and with `user`/`password` required when given (in its
    /// config file, never on its command line).
    pub async fn start_tls(
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
        user: Option<(&str, &str)>,
    ) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("nats.conf");
        let mut text = format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
            cert_file.display().to_string(),
            key_file.display().to_string()
        );
        if let Some((user, password)) = user {
            text.push_str(&format!(
                "authorization {{\n  user: {user:?}\n  password: {password:?}\n}}\n"
            ));
        }
        std::fs::write(&config, text).expect("write nats.conf");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            dir,
            config: Some(config),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log = self.dir.path().join("nats-server.log");
        let mut cmd = Command::new(find_binary("nats-server", &[]));
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let child = cmd
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
        config: format!("url: {url:?}\nconnect_timeout: 2s\n"),
        ..PatternEntry::new(name, bin("trellis-nats"), namespaces)
    }
}
