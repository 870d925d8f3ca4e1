//! Logs go to stderr, never stdout (stdout carries only the handshake).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::LogFormat;

/// Installs the global subscriber: level from `RUST_LOG` (default `info`),
/// JSON lines when asked, otherwise text with colour only on a terminal.
/// Does nothing if a subscriber is already installed (e.g. by a test).
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => {
            let bad = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
            (EnvFilter::new("info"), bad.map(|v| (v, e)))
        }
    };
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    // The log filter applies to log lines only: spans exported as traces
    // (`crate::traces`) are chosen by their own filter.
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(crate::traces::layer())
        .try_init();
    if installed.is_ok()
        && let Some((value, err)) = bad_filter
    {
        tracing::warn!(RUST_LOG = %value, error = %err, "RUST_LOG is not a valid filter; logging at info");
    }
}
