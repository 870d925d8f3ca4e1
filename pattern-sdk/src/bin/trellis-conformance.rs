//! `trellis-conformance`: runs the conformance kit's suites against any
//! pattern, in any language — one it spawns and drives through the pattern
//! protocol as the proxy does (`--command`), or one already running
//! (`--addr`) — and reports each check. A thin shell over
//! `pattern_sdk::conformance::run`.
//!
//! Exit status: 0 every check passed, 1 a check failed, 2 nothing could be
//! checked (a usage error, or the pattern did not start).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pattern_sdk::conformance::{self, Options, PatternCommand, Report, Suite, Target};

/// Check a Trellis pattern against the pattern protocol and the data
/// contracts (docs/pattern-protocol.md).
///
/// Spawned (--command): the pattern gets the TRELLIS_PATTERN_* environment,
/// its handshake line is read, then Initialize (with the --config file),
/// Start, a first SERVING health check, the suites it claims in
/// InitializeResponse.interfaces, and Lifecycle/Stop, after which it must
/// exit 0.
///
/// Running (--addr): a pattern (or a proxy in front of one) initialized and
/// started by someone else; name the suites with --suite.
#[derive(Debug, Parser)]
#[command(name = "trellis-conformance", version, verbatim_doc_comment)]
struct Args {
    /// The pattern's executable, spawned as the proxy would.
    #[arg(long, value_name = "PATH", conflicts_with = "addr")]
    command: Option<PathBuf>,

    /// An argument for --command (repeat for several, in order).
    #[arg(
        long = "arg",
        value_name = "A",
        allow_hyphen_values = true,
        requires = "command"
    )]
    args: Vec<String>,

    /// A YAML file holding the pattern's `config:` block (the mapping under
    /// `config:` in the proxy's pattern entry), sent with Initialize.
    #[arg(long, value_name = "FILE", requires = "command")]
    config: Option<PathBuf>,

    /// The pattern's name (TRELLIS_PATTERN_NAME, InitializeRequest.name);
    /// default: the file name of --command.
    #[arg(long, value_name = "NAME", requires = "command")]
    name: Option<String>,

    /// A running pattern's gRPC address, e.g. http://127.0.0.1:9100.
    #[arg(long, value_name = "URL")]
    addr: Option<String>,

    /// The suites to run; default with --command: those the pattern claims.
    #[arg(long, value_enum)]
    suite: Option<SuiteArg>,

    /// The two namespaces the checks use (the second for isolation);
    /// default: kv kv-other for kv, pubsub pubsub-other for pubsub. Through
    /// a proxy, both must be routed to the pattern under test.
    #[arg(long, num_args = 2, value_names = ["NAMESPACE", "OTHER"])]
    namespace: Option<Vec<String>>,

    /// Run only this check (`round_trip`, or `kv.round_trip`); repeatable.
    #[arg(long = "check", value_name = "NAME")]
    checks: Vec<String>,

    /// The bound on every wait and start-up step (only matters when
    /// something is broken).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    patience: Duration,

    /// The grace sent with Lifecycle/Stop to a spawned pattern.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    stop_grace: Duration,

    /// `text`: a line per check and a summary; `junit`: JUnit XML.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,

    /// Write the report here instead of stdout (the text lines still go to
    /// stdout).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SuiteArg {
    Kv,
    Pubsub,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Junit,
}

/// A usage or start-up problem: printed, exit status 2.
fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("trellis-conformance: {message}");
    ExitCode::from(2)
}

/// The `config:` block from a YAML file, as the JSON the kit sends.
fn read_config(path: &Path) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_yaml::from_str(&text).map_err(|e| {
        format!(
            "--config {} is not valid YAML: {e}; it holds the pattern's config block, e.g. \
             `url: redis://127.0.0.1:6379`",
            path.display()
        )
    })?;
    match value {
        serde_json::Value::Object(_) | serde_json::Value::Null => Ok(value),
        other => Err(format!(
            "--config {} must hold a mapping (the pattern's config block, e.g. `url: …`), \
             not {other}",
            path.display()
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();

    let target = match (&args.command, &args.addr) {
        (Some(program), None) => {
            let config = match &args.config {
                Some(path) => match read_config(path) {
                    Ok(config) => config,
                    Err(e) => return usage(e),
                },
                None => serde_json::Value::Null,
            };
            let name = args.name.clone().unwrap_or_else(|| {
                program
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "pattern".into())
            });
            Target::Spawn(PatternCommand {
                program: program.clone(),
                args: args.args.clone(),
                name,
                config,
            })
        }
        (None, Some(addr)) => Target::Connect(addr.clone()),
        _ => {
            return usage(
                "say what to check: --command PATH (spawn a pattern) or --addr URL (a running \
                 one); --help shows every option",
            );
        }
    };

    // In text mode, or when the XML goes to a file, each outcome's line is
    // printed as it comes; with XML on stdout, the lines go to stderr.
    let xml_on_stdout = args.format == Format::Junit && args.output.is_none();
    let progress: conformance::Progress = Arc::new(move |suite, outcome| {
        let line = conformance::outcome_line(suite, outcome);
        if xml_on_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    });
    let options = Options {
        suites: match args.suite {
            None => Vec::new(),
            Some(SuiteArg::Kv) => vec![Suite::Kv],
            Some(SuiteArg::Pubsub) => vec![Suite::PubSub],
            Some(SuiteArg::All) => Suite::ALL.to_vec(),
        },
        namespaces: args.namespace.as_deref().and_then(|pair| match pair {
            [a, b] => Some((a.clone(), b.clone())),
            _ => None,
        }),
        checks: args.checks.clone(),
        patience: args.patience,
        stop_grace: args.stop_grace,
        progress: Some(progress),
    };

    // Ctrl-C drops the run, which kills a spawned pattern.
    let reports: Vec<Report> = tokio::select! {
        done = conformance::run(target, &options) => match done {
            Ok(reports) => reports,
            Err(e) => return usage(e),
        },
        _ = tokio::signal::ctrl_c() => return usage("interrupted"),
    };

    let summary = conformance::summary(&reports);
    let content = match args.format {
        Format::Text => conformance::text(&reports),
        Format::Junit => match conformance::junit(&reports) {
            Ok(xml) => xml,
            Err(e) => return usage(e),
        },
    };
    match &args.output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &content) {
                return usage(format!("cannot write --output {}: {e}", path.display()));
            }
            println!("{summary}");
        }
        // The lines went out already: the summary closes them.
        None if args.format == Format::Text => println!("{summary}"),
        None => {
            let mut stdout = std::io::stdout().lock();
            if stdout
                .write_all(content.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return usage("cannot write the report to stdout");
            }
            eprintln!("{summary}");
        }
    }
    if reports.iter().all(Report::all_passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
