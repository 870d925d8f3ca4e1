//! Reading the pattern's start-up line from its stdout, bounded. The
//! line's syntax, [`Endpoint`] and the version live in
//! `trellis_proto::protocol`, shared with the SDK and the conformance kit.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
pub use trellis_proto::protocol::Endpoint;
use trellis_proto::protocol::{self, MAX_HANDSHAKE_LINE};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HandshakeError {
    #[error("the pattern closed stdout before writing its handshake line")]
    Eof,
    #[error("the handshake line is longer than {MAX_HANDSHAKE_LINE} bytes")]
    TooLong,
    #[error(transparent)]
    Line(#[from] protocol::HandshakeError),
    #[error("reading the handshake failed: {0}")]
    Io(String),
}

/// Reads the first line from `out` and parses it. Bounded: at most
/// [`MAX_HANDSHAKE_LINE`] bytes are read.
pub async fn read<R: AsyncBufRead + Unpin>(out: &mut R) -> Result<Endpoint, HandshakeError> {
    let mut buf = Vec::new();
    let n = (&mut *out)
        .take(MAX_HANDSHAKE_LINE + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| HandshakeError::Io(e.to_string()))?;
    if n == 0 {
        return Err(HandshakeError::Eof);
    }
    if n as u64 > MAX_HANDSHAKE_LINE {
        return Err(HandshakeError::TooLong);
    }
    Ok(protocol::parse_handshake(&String::from_utf8_lossy(&buf))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_stops_at_eof_and_at_the_length_limit() {
        let mut empty: &[u8] = b"";
        assert_eq!(read(&mut empty).await, Err(HandshakeError::Eof));
        let long = vec![b'x'; MAX_HANDSHAKE_LINE as usize + 10];
        let mut r: &[u8] = &long;
        assert_eq!(read(&mut r).await, Err(HandshakeError::TooLong));
        let mut ok: &[u8] = b"TRELLIS|1|tcp|127.0.0.1:9|grpc\nlater output\n";
        assert!(read(&mut ok).await.is_ok());
        assert_eq!(ok, b"later output\n", "reads only the first line");
        let mut bad: &[u8] = b"hello\n";
        assert!(matches!(
            read(&mut bad).await,
            Err(HandshakeError::Line(
                protocol::HandshakeError::Malformed { .. }
            ))
        ));
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
