//! The pattern protocol's plain-text parts, in one place for the proxy,
//! the SDK and the conformance kit (docs/pattern-protocol.md): the
//! handshake line a pattern writes first on stdout, the [`Endpoint`] it
//! names, the protocol version, and the environment variables the proxy
//! sets for a pattern.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The protocol version this build speaks.
pub const VERSION: u32 = crate::PATTERN_PROTOCOL_VERSION;

/// The handshake line's first field.
pub const MAGIC: &str = "TRELLIS";

/// The longest handshake line a reader accepts; a child that writes more
/// without a newline is not speaking the protocol.
pub const MAX_HANDSHAKE_LINE: u64 = 4096;

/// The environment the proxy gives a pattern process.
pub mod env {
    /// The protocol version the proxy speaks (`1`).
    pub const PROTOCOL: &str = "TRELLIS_PATTERN_PROTOCOL";
    /// The pattern's name in the proxy's configuration.
    pub const NAME: &str = "TRELLIS_PATTERN_NAME";
    /// Where to listen: `127.0.0.1:0`, `127.0.0.1:9100`, or `unix:/path`.
    pub const LISTEN: &str = "TRELLIS_PATTERN_LISTEN";
    /// How to log on stderr: `json` under the proxy.
    pub const LOG_FORMAT: &str = "TRELLIS_LOG_FORMAT";
    /// A fresh random secret for this start of the process (64 hex
    /// digits). When it is set, a pattern must refuse every call whose
    /// [`SECRET_HEADER`](super::SECRET_HEADER) does not carry it, with
    /// UNAUTHENTICATED, and must not pass it on to processes it starts.
    /// Only ever in the environment: never on the command line.
    pub const SECRET: &str = "TRELLIS_PATTERN_SECRET";
    /// Every variable of the pattern protocol starts with this (a
    /// pattern's `env:` may not set them).
    pub const PREFIX: &str = "TRELLIS_PATTERN_";
}

/// The request header (gRPC metadata) that carries
/// [`env::SECRET`] on every call the proxy makes to a pattern: lifecycle,
/// health, data and metrics calls alike.
pub const SECRET_HEADER: &str = "trellis-pattern-secret";

/// Whether `presented` is `expected`, in time that depends only on their
/// lengths (the secret's length is public: 64 hex digits), so a caller
/// cannot learn the secret a byte at a time from response times. Every
/// byte is compared, and the differences are OR-ed together, with no
/// early exit; `black_box` keeps the compiler from adding one.
pub fn secret_matches(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let diff = presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | std::hint::black_box(a ^ b));
    std::hint::black_box(diff) == 0
}

/// Where a pattern serves gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    /// An absolute socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// The handshake line for `endpoint`, without its newline:
/// `TRELLIS|1|tcp|127.0.0.1:40123|grpc`.
pub fn format_handshake(endpoint: &Endpoint) -> String {
    let (network, address) = match endpoint {
        Endpoint::Tcp(addr) => ("tcp", addr.to_string()),
        Endpoint::Unix(path) => ("unix", path.display().to_string()),
    };
    format!("{MAGIC}|{VERSION}|{network}|{address}|grpc")
}

/// Why a line is not a handshake this build accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    Malformed { line: String, why: String },
    Version { got: String, want: u32 },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Malformed { line, why } => write!(
                f,
                "the first line on stdout is not a handshake: {line:?} ({why}); expected e.g. \
                 \"TRELLIS|1|tcp|127.0.0.1:40123|grpc\" — a pattern must write the handshake \
                 before anything else and log to stderr"
            ),
            HandshakeError::Version { got, want } => write!(
                f,
                "the pattern speaks protocol version {got}, this proxy speaks {want}; rebuild \
                 the pattern against a matching pattern-sdk"
            ),
        }
    }
}

impl std::error::Error for HandshakeError {}

/// Parses one handshake line (a trailing newline is ignored).
pub fn parse_handshake(line: &str) -> Result<Endpoint, HandshakeError> {
    let bad = |why: &str| HandshakeError::Malformed {
        line: line.to_string(),
        why: why.to_string(),
    };
    let parts: Vec<&str> = line.trim_end_matches(['\r', '\n']).split('|').collect();
    let [magic, version, network, address, protocol] = parts.as_slice() else {
        return Err(bad("it must have 5 fields separated by '|'"));
    };
    if *magic != MAGIC {
        return Err(bad("the first field must be TRELLIS"));
    }
    if version.parse::<u32>().ok() != Some(VERSION) {
        return Err(HandshakeError::Version {
            got: version.to_string(),
            want: VERSION,
        });
    }
    if *protocol != "grpc" {
        return Err(bad("the protocol field must be grpc"));
    }
    match *network {
        "tcp" => address
            .parse::<SocketAddr>()
            .map(Endpoint::Tcp)
            .map_err(|_| bad("the address must be an IP:port such as 127.0.0.1:40123")),
        "unix" if address.starts_with('/') => Ok(Endpoint::Unix(PathBuf::from(address))),
        "unix" => Err(bad("a unix socket address must be an absolute path")),
        _ => Err(bad("the network must be tcp or unix")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_is_what_is_read() {
        for ep in [
            Endpoint::Tcp("127.0.0.1:40123".parse().unwrap()),
            Endpoint::Tcp("[::1]:9100".parse().unwrap()),
            Endpoint::Unix("/run/trellis/mem.sock".into()),
        ] {
            let line = format_handshake(&ep);
            assert_eq!(parse_handshake(&format!("{line}\n")), Ok(ep));
        }
        assert_eq!(
            format_handshake(&Endpoint::Tcp("[::1]:9100".parse().unwrap())),
            "TRELLIS|1|tcp|[::1]:9100|grpc"
        );
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secret_matches(b"abc", b"abc"));
        assert!(!secret_matches(b"abd", b"abc"));
        assert!(!secret_matches(b"ab", b"abc"));
        assert!(!secret_matches(b"", b"abc"));
        assert!(secret_matches(b"", b""));
    }

    #[test]
    fn what_is_not_a_handshake_says_why() {
        let why = |line: &str| match parse_handshake(line) {
            Err(HandshakeError::Malformed { why, .. }) => why,
            other => panic!("{line:?}: {other:?}"),
        };
        assert!(why("hello").contains("5 fields"));
        assert!(why("NOPE|1|tcp|127.0.0.1:1|grpc").contains("TRELLIS"));
        assert!(why("TRELLIS|1|tcp|localhost:1|grpc").contains("IP:port"));
        assert!(why("TRELLIS|1|unix|rel.sock|grpc").contains("absolute"));
        assert!(why("TRELLIS|1|udp|127.0.0.1:1|grpc").contains("tcp or unix"));
        assert!(why("TRELLIS|1|tcp|127.0.0.1:1|http").contains("grpc"));
        assert_eq!(
            parse_handshake("TRELLIS|2|tcp|127.0.0.1:1|grpc"),
            Err(HandshakeError::Version {
                got: "2".into(),
                want: 1
            })
        );
    }
}
