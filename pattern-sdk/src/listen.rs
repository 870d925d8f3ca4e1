//! Where a pattern listens: parsing `TRELLIS_PATTERN_LISTEN` and binding it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::net::{TcpListener, UnixListener};

use crate::Endpoint;

/// A listen address: `127.0.0.1:0` (the kernel picks a free port),
/// `[::1]:9100`, or `unix:/path/to/socket`. Host names are not accepted: the
/// handshake must name an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Default for ListenAddr {
    fn default() -> Self {
        Self::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Why a listen address did not parse; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenAddrError(
                    "unix: needs a socket path, e.g. unix:/run/trellis/memstore.sock".into(),
                ));
            }
            if path.contains(['|', '\n', '\r']) {
                return Err(ListenAddrError(format!(
                    "the socket path {path:?} contains '|' or a line break, which the \
                     handshake line cannot carry; choose another path"
                )));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse().map(Self::Tcp).map_err(|_| {
            ListenAddrError(format!(
                "{s:?} is not an IP address with a port (e.g. 127.0.0.1:0 or [::1]:9100) \
                 nor unix:/path/to/socket; host names are not accepted"
            ))
        })
    }
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

impl Listener {
    /// Binds `addr`. A unix socket path is made absolute, and a stale socket
    /// file left by a previous run is removed first (never a live one, nor a
    /// file that is not a socket).
    pub async fn bind(addr: &ListenAddr) -> Result<Self, BindError> {
        let fail = |source: io::Error| BindError::new(addr, source);
        match addr {
            ListenAddr::Tcp(sock) => TcpListener::bind(sock).await.map(Self::Tcp).map_err(fail),
            ListenAddr::Unix(path) => {
                let path = std::path::absolute(path).map_err(fail)?;
                remove_stale_socket(&path).map_err(fail)?;
                let listener = UnixListener::bind(&path).map_err(fail)?;
                Ok(Self::Unix(listener, SocketFile(path)))
            }
        }
    }

    /// Where the listener can be reached, for the handshake.
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(Endpoint::Tcp),
            Listener::Unix(_, file) => Ok(Endpoint::Unix(file.0.clone())),
        }
    }
}

/// A socket file this process created; removed when dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket exists at that path",
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on that socket",
        ));
    }
    std::fs::remove_file(path)
}

/// Binding failed: which address, the OS error, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}; {hint}")]
pub struct BindError {
    addr: String,
    #[source]
    source: io::Error,
    hint: &'static str,
}

impl BindError {
    fn new(addr: &ListenAddr, source: io::Error) -> Self {
        let hint = match source.kind() {
            io::ErrorKind::AddrInUse => {
                "choose a free address, or use 127.0.0.1:0 to let the kernel pick a port \
                 (TRELLIS_PATTERN_LISTEN or --listen)"
            }
            io::ErrorKind::PermissionDenied => {
                "use a port above 1023, or a socket path this user may write to"
            }
            io::ErrorKind::AddrNotAvailable => {
                "that IP address is not on this machine; use 127.0.0.1 or one of its addresses"
            }
            io::ErrorKind::AlreadyExists => "remove the file, or choose another socket path",
            io::ErrorKind::NotFound => "create the socket's directory first",
            _ => "check TRELLIS_PATTERN_LISTEN (or --listen)",
        };
        Self {
            addr: addr.to_string(),
            source,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ListenAddr, String> {
        s.parse::<ListenAddr>().map_err(|e| e.to_string())
    }

    #[test]
    fn tcp_addresses() {
        assert_eq!(parse("127.0.0.1:0"), Ok(ListenAddr::default()));
        assert_eq!(
            parse("[::1]:9100"),
            Ok(ListenAddr::Tcp("[::1]:9100".parse().unwrap()))
        );
    }

    #[test]
    fn unix_paths() {
        assert_eq!(
            parse("unix:/tmp/p.sock"),
            Ok(ListenAddr::Unix("/tmp/p.sock".into()))
        );
        assert_eq!(
            parse("unix:rel.sock"),
            Ok(ListenAddr::Unix("rel.sock".into()))
        );
    }

    #[test]
    fn bad_addresses_say_what_is_accepted() {
        for bad in [
            "localhost:9100",
            "127.0.0.1",
            "",
            ":80",
            "tcp://127.0.0.1:1",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("127.0.0.1:0"), "{bad}: {err}");
        }
        assert!(parse("unix:").unwrap_err().contains("needs a socket path"));
        assert!(parse("unix:/tmp/a|b").unwrap_err().contains("'|'"));
    }

    #[test]
    fn display_round_trips() {
        for s in ["127.0.0.1:0", "[::1]:9100", "unix:/tmp/p.sock"] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_bound_port() {
        let l = Listener::bind(&ListenAddr::default()).await.unwrap();
        match l.endpoint().unwrap() {
            Endpoint::Tcp(addr) => assert_ne!(addr.port(), 0),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tcp_address_in_use_names_address_and_fix() {
        let first = Listener::bind(&ListenAddr::default()).await.unwrap();
        let Ok(Endpoint::Tcp(taken)) = first.endpoint() else {
            panic!("no tcp endpoint")
        };
        let err = Listener::bind(&ListenAddr::Tcp(taken)).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&taken.to_string()), "{msg}");
        assert!(msg.contains("os error"), "{msg}");
        assert!(msg.contains("127.0.0.1:0"), "{msg}");
    }

    #[tokio::test]
    async fn unix_socket_replaces_a_stale_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        // A stale socket: bound, then its listener dropped without cleanup.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());

        let l = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap();
        assert_eq!(l.endpoint().unwrap(), Endpoint::Unix(path.clone()));

        // A live socket is not taken over.
        let err = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");

        drop(l);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn unix_path_that_is_a_regular_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.txt");
        std::fs::write(&path, b"keep me").unwrap();
        let err = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }
}
