//! The pattern's start-up line: `TRELLIS|1|tcp|127.0.0.1:40123|grpc`.
//! See docs/pattern-protocol.md. Only this module knows its syntax.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// The handshake line may not be longer than this; a child that writes more
/// without a newline is not speaking the protocol.
pub const MAX_LINE: u64 = 4096;
const MAGIC: &str = "TRELLIS";

/// Where a pattern serves gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HandshakeError {
    #[error("the pattern closed stdout before writing its handshake line")]
    Eof,
    #[error("the handshake line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error(
        "the first line on stdout is not a handshake: {line:?} ({why}); expected e.g. \
         \"TRELLIS|1|tcp|127.0.0.1:40123|grpc\" — a pattern must write the handshake before \
         anything else and log to stderr"
    )]
    Malformed { line: String, why: String },
    #[error(
        "the pattern speaks protocol version {got}, this proxy speaks {want}; rebuild the \
         pattern against a matching pattern-sdk"
    )]
    Version { got: String, want: u32 },
    #[error("reading the handshake failed: {0}")]
    Io(String),
}

/// Parses one handshake line (without its newline).
pub fn parse(line: &str) -> Result<Endpoint, HandshakeError> {
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
    if version.parse::<u32>().ok() != Some(trellis_proto::PATTERN_PROTOCOL_VERSION) {
        return Err(HandshakeError::Version {
            got: version.to_string(),
            want: trellis_proto::PATTERN_PROTOCOL_VERSION,
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

/// Reads the first line from `out` and parses it. Bounded: at most
/// [`MAX_LINE`] bytes are read.
pub async fn read<R: AsyncBufRead + Unpin>(out: &mut R) -> Result<Endpoint, HandshakeError> {
    let mut buf = Vec::new();
    let n = (&mut *out)
        .take(MAX_LINE + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| HandshakeError::Io(e.to_string()))?;
    if n == 0 {
        return Err(HandshakeError::Eof);
    }
    if n as u64 > MAX_LINE {
        return Err(HandshakeError::TooLong);
    }
    parse(&String::from_utf8_lossy(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            parse("TRELLIS|1|tcp|127.0.0.1:40123|grpc\n"),
            Ok(Endpoint::Tcp("127.0.0.1:40123".parse().unwrap()))
        );
        assert_eq!(
            parse("TRELLIS|1|unix|/tmp/p.sock|grpc"),
            Ok(Endpoint::Unix("/tmp/p.sock".into()))
        );
    }

    #[test]
    fn rejects_what_is_not_a_handshake() {
        for line in [
            "",
            "hello world",
            "TRELLIS|1|tcp|127.0.0.1:1",
            "PLUGIN|1|tcp|127.0.0.1:1|grpc",
            "TRELLIS|1|tcp|localhost:1|grpc",
            "TRELLIS|1|udp|127.0.0.1:1|grpc",
            "TRELLIS|1|tcp|127.0.0.1:1|http",
            "TRELLIS|1|unix|relative.sock|grpc",
        ] {
            assert!(
                matches!(parse(line), Err(HandshakeError::Malformed { .. })),
                "{line:?} → {:?}",
                parse(line)
            );
        }
    }

    #[test]
    fn version_mismatch_is_its_own_error() {
        assert!(matches!(
            parse("TRELLIS|2|tcp|127.0.0.1:1|grpc"),
            Err(HandshakeError::Version { .. })
        ));
    }

    #[tokio::test]
    async fn read_stops_at_eof_and_at_the_length_limit() {
        let mut empty: &[u8] = b"";
        assert_eq!(read(&mut empty).await, Err(HandshakeError::Eof));
        let long = vec![b'x'; MAX_LINE as usize + 10];
        let mut r: &[u8] = &long;
        assert_eq!(read(&mut r).await, Err(HandshakeError::TooLong));
        let mut ok: &[u8] = b"TRELLIS|1|tcp|127.0.0.1:9|grpc\nlater output\n";
        assert!(read(&mut ok).await.is_ok());
        assert_eq!(ok, b"later output\n", "reads only the first line");
    }

    #[test]
    fn endpoint_displays_as_a_uri() {
        assert_eq!(
            Endpoint::Tcp("127.0.0.1:5".parse().unwrap()).to_string(),
            "tcp://127.0.0.1:5"
        );
        assert_eq!(Endpoint::Unix("/a/b".into()).to_string(), "unix:///a/b");
    }
}
