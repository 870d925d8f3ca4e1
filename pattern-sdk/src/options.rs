//! Everything a pattern process reads from its command line and environment,
//! in one place. The proxy sets the `TRELLIS_*` variables; the flags are for
//! running a pattern by hand.

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::ListenAddr;

#[derive(Debug, Clone, Parser)]
#[command(about = "A Trellis pattern: serves data interfaces to the Trellis proxy over gRPC.")]
pub struct Options {
    /// Where to listen: 127.0.0.1:0 (the kernel picks a free port), an IP and
    /// port, or unix:/path/to/socket.
    #[arg(long, env = trellis_proto::protocol::env::LISTEN, default_value_t = ListenAddr::default())]
    pub listen: ListenAddr,

    /// The pattern's name in the proxy configuration (used in logs until
    /// Initialize names it).
    #[arg(long, env = trellis_proto::protocol::env::NAME)]
    pub name: Option<String>,

    /// Log format on stderr. The level comes from RUST_LOG (default info).
    #[arg(long, env = trellis_proto::protocol::env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The pattern protocol version the proxy speaks (set by the proxy).
    #[arg(long, env = trellis_proto::protocol::env::PROTOCOL, hide = true)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colour only on a terminal).
    Text,
    /// One JSON object per line, for the proxy to parse.
    Json,
}

impl Options {
    /// Parses the process's arguments and environment. `--help` and
    /// `--version` name the pattern; a bad value prints the problem and exits
    /// with status 2.
    pub fn from_env(name: &'static str, version: &'static str) -> Self {
        let matches = Self::command().name(name).version(version).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let o = Options::try_parse_from([
            "p",
            "--listen",
            "unix:/tmp/x.sock",
            "--name",
            "cache",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(o.listen, ListenAddr::Unix("/tmp/x.sock".into()));
        assert_eq!(o.name.as_deref(), Some("cache"));
        assert_eq!(o.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_listen_address_is_a_usage_error() {
        let err = Options::try_parse_from(["p", "--listen", "localhost:1"]).unwrap_err();
        assert!(
            err.to_string().contains("host names are not accepted"),
            "{err}"
        );
    }

    #[test]
    fn command_is_well_formed() {
        Options::command().debug_assert();
    }
}
