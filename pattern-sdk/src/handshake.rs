//! The one line a pattern writes to stdout: `TRELLIS|1|tcp|127.0.0.1:40123|grpc`.

use std::io::Write;

pub use trellis_proto::protocol::{Endpoint, format_handshake};

/// Writes the handshake line and flushes, so the proxy sees it at once.
/// Nothing else is ever written to stdout.
pub(crate) fn write_handshake(out: &mut impl Write, endpoint: &Endpoint) -> std::io::Result<()> {
    writeln!(out, "{}", format_handshake(endpoint))?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_line() {
        let ep = Endpoint::Tcp("127.0.0.1:40123".parse().unwrap());
        assert_eq!(format_handshake(&ep), "TRELLIS|1|tcp|127.0.0.1:40123|grpc");
    }

    #[test]
    fn ipv6_line_brackets_the_host() {
        let ep = Endpoint::Tcp("[::1]:9100".parse().unwrap());
        assert_eq!(format_handshake(&ep), "TRELLIS|1|tcp|[::1]:9100|grpc");
    }

    #[test]
    fn unix_line() {
        let ep = Endpoint::Unix("/run/trellis/mem.sock".into());
        assert_eq!(
            format_handshake(&ep),
            "TRELLIS|1|unix|/run/trellis/mem.sock|grpc"
        );
    }

    #[test]
    fn written_line_ends_with_a_newline() {
        let mut out = Vec::new();
        let ep = Endpoint::Tcp("127.0.0.1:1".parse().unwrap());
        write_handshake(&mut out, &ep).unwrap();
        assert_eq!(out, b"TRELLIS|1|tcp|127.0.0.1:1|grpc\n");
    }
}
