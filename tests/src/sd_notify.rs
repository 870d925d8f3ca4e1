//! The service manager's side of `sd_notify(3)` for tests: a Unix datagram
//! socket in a temporary directory, named to the proxy by `NOTIFY_SOCKET`,
//! that keeps every message in arrival order.

use std::path::PathBuf;

use tokio::net::UnixDatagram;

use crate::PATIENCE;

/// One notification datagram: its `KEY=value` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message(pub Vec<String>);

impl Message {
    /// Does the message hold this exact line (e.g. `READY=1`)?
    pub fn has(&self, line: &str) -> bool {
        self.0.iter().any(|l| l == line)
    }

    /// The value of `key` (`STATUS`, `MONOTONIC_USEC`, …), if present.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// A bound notification socket.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// The next message; panics after [`PATIENCE`] without one.
    pub async fn next(&self) -> Message {
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(PATIENCE, self.socket.recv(&mut buf))
            .await
            .expect("a notification within PATIENCE")
            .expect("recv on the notify socket");
        let text = String::from_utf8_lossy(&buf[..n]);
        Message(
            text.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    /// Every message already waiting, without waiting for more.
    pub fn drain(&self) -> Vec<Message> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        while let Ok(n) = self.socket.try_recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            out.push(Message(
                text.lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect(),
            ));
        }
        out
    }
}
