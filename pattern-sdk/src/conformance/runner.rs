//! Running the suites against one target, as the `trellis-conformance`
//! command and the Rust tests do: spawn the pattern (or connect to a running
//! one), run the suites it serves, stop it, and report each check.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pattern_sdk::conformance::{self, Options, Target};
//!
//! let target = Target::spawn("target/debug/trellis-memstore", serde_json::json!({}));
//! let reports = conformance::run(target, &Options::default()).await?;
//! print!("{}", conformance::text(&reports));
//! assert!(reports.iter().all(|r| r.all_passed()));
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;

use super::kv::PatternProcess;
use super::{CheckResult, Outcome, Report, kv, pubsub, run_checks};

/// A suite of checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Suite {
    /// `trellis.data.v1.KeyValue` ([`kv::CHECKS`]).
    Kv,
    /// `trellis.data.v1.PubSub` ([`pubsub::CHECKS`]).
    PubSub,
}

impl Suite {
    /// Every suite, in the order they run.
    pub const ALL: [Suite; 2] = [Suite::Kv, Suite::PubSub];

    /// The suite's name in reports: `kv` or `pubsub`.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Kv => "kv",
            Suite::PubSub => "pubsub",
        }
    }

    /// The checks of this suite, in the order they run.
    pub fn checks(self) -> &'static [&'static str] {
        match self {
            Suite::Kv => kv::CHECKS,
            Suite::PubSub => pubsub::CHECKS,
        }
    }

    /// The gRPC service this suite checks.
    pub fn service(self) -> &'static str {
        match self {
            Suite::Kv => trellis_proto::KEY_VALUE_SERVICE,
            Suite::PubSub => trellis_proto::PUB_SUB_SERVICE,
        }
    }

    /// The namespaces the Rust tests use for this suite: `kv`/`kv-other`,
    /// `pubsub`/`pubsub-other`.
    pub fn default_namespaces(self) -> (&'static str, &'static str) {
        match self {
            Suite::Kv => ("kv", "kv-other"),
            Suite::PubSub => ("pubsub", "pubsub-other"),
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The suite of the checks the runner makes of the protocol itself (only
/// on a pattern it spawned).
pub const LIFECYCLE: &str = "lifecycle";

/// The lifecycle check: after `Lifecycle/Stop(grace)` the pattern exits 0
/// within `grace` + 5 s (docs/pattern-protocol.md, "What a pattern does" 6).
pub const STOP_CHECK: &str = "stop";

/// A pattern to spawn the way the proxy does.
#[derive(Debug, Clone)]
pub struct PatternCommand {
    /// The executable (a path, or a name looked up on `PATH`).
    pub program: PathBuf,
    /// Its arguments (a pattern entry's `args:`).
    pub args: Vec<String>,
    /// `TRELLIS_PATTERN_NAME` and `InitializeRequest.name`.
    pub name: String,
    /// The pattern's `config:` block, as JSON (an object, or null for none).
    pub config: serde_json::Value,
}

/// What the suites run against.
#[derive(Debug, Clone)]
pub enum Target {
    /// Spawn the pattern, handshake, `Initialize`, `Start`, wait for
    /// `SERVING`; `Stop` it at the end.
    Spawn(PatternCommand),
    /// A pattern (or a proxy) already running, initialized and started by
    /// someone else, at a URL such as `http://127.0.0.1:9100`.
    Connect(String),
}

impl Target {
    /// Spawn `program` without arguments, named after its file name.
    pub fn spawn(program: impl Into<PathBuf>, config: serde_json::Value) -> Target {
        let program = program.into();
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pattern".into());
        Target::Spawn(PatternCommand {
            program,
            args: Vec::new(),
            name,
            config,
        })
    }
}

/// Called after each check with its suite and outcome (for progress lines).
pub type Progress = Arc<dyn Fn(&'static str, &Outcome) + Send + Sync>;

/// How to run.
#[derive(Clone)]
pub struct Options {
    /// The suites to run; empty: what a spawned pattern claims in
    /// `InitializeResponse.interfaces` (a [`Target::Connect`] needs them
    /// named).
    pub suites: Vec<Suite>,
    /// The two namespaces every suite uses; `None`: each suite's
    /// [`Suite::default_namespaces`].
    pub namespaces: Option<(String, String)>,
    /// Only these checks (`round_trip`, or `kv.round_trip` for one suite's);
    /// empty: every check.
    pub checks: Vec<String>,
    /// The bound on each wait and each start-up step.
    pub patience: Duration,
    /// The grace sent with `Lifecycle/Stop` to a spawned pattern.
    pub stop_grace: Duration,
    /// Told of each outcome as it comes.
    pub progress: Option<Progress>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            suites: Vec::new(),
            namespaces: None,
            checks: Vec::new(),
            patience: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
            progress: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("suites", &self.suites)
            .field("namespaces", &self.namespaces)
            .field("checks", &self.checks)
            .field("patience", &self.patience)
            .field("stop_grace", &self.stop_grace)
            .finish_non_exhaustive()
    }
}

/// Why no check could run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request cannot be carried out as asked (an unknown check, no
    /// suite for a running pattern, …).
    #[error("{0}")]
    Usage(String),
    /// The pattern could not be spawned, did not hand-shake, initialize,
    /// start or report SERVING; the message says which step and quotes its
    /// stderr.
    #[error("the pattern did not start: {0}")]
    Start(String),
    /// The running pattern could not be reached.
    #[error("{0}")]
    Connect(String),
}

/// Runs the suites against `target`: one [`Report`] per suite, then (for a
/// spawned pattern) the [`LIFECYCLE`] report of its stop. A check that fails
/// is in its report; `Err` means nothing could be checked.
pub async fn run(target: Target, options: &Options) -> Result<Vec<Report>, RunError> {
    check_names(&options.checks, &Suite::ALL)?;
    match target {
        Target::Spawn(command) => {
            let pattern = PatternProcess::spawn_command(
                &command.program,
                &command.args,
                &command.name,
                command.config,
                options.patience,
            )
            .await
            .map_err(RunError::Start)?;
            let suites = if options.suites.is_empty() {
                claimed_suites(&pattern.initialized().interfaces)?
            } else {
                options.suites.clone()
            };
            let mut reports = run_suites(pattern.channel(), &suites, options).await?;
            if wants(&options.checks, LIFECYCLE, STOP_CHECK) {
                // Not through `run_checks`: the stop consumes the process.
                let grace = options.stop_grace;
                let started = Instant::now();
                let result = match pattern.stop(grace).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "after Lifecycle/Stop(grace {grace:?}) the pattern exited with a \
                         non-zero status; want exit 0 once in-flight work is done"
                    )),
                    Err(e) => Err(format!(
                        "after Lifecycle/Stop(grace {grace:?}) want exit 0 within the grace \
                         (the kit kills it after {:?}): {e}",
                        grace + Duration::from_secs(5)
                    )),
                };
                let outcome = Outcome {
                    name: STOP_CHECK,
                    result,
                    elapsed: started.elapsed(),
                };
                if let Some(progress) = &options.progress {
                    progress(LIFECYCLE, &outcome);
                }
                reports.push(Report {
                    suite: LIFECYCLE,
                    outcomes: vec![outcome],
                });
            } else {
                // Not checked, but still stopped politely (and killed if need be).
                let _ = pattern.stop(options.stop_grace).await;
            }
            Ok(reports)
        }
        Target::Connect(addr) => {
            if options.suites.is_empty() {
                return Err(RunError::Usage(format!(
                    "say which suites to run against {addr}: a running pattern is not asked \
                     what it serves (--suite kv, pubsub or all)"
                )));
            }
            let channel = connect(&addr, options.patience).await?;
            run_suites(channel, &options.suites, options).await
        }
    }
}

/// The suites for the services a pattern says it implements.
fn claimed_suites(interfaces: &[String]) -> Result<Vec<Suite>, RunError> {
    let suites: Vec<Suite> = Suite::ALL
        .into_iter()
        .filter(|s| interfaces.iter().any(|i| i == s.service()))
        .collect();
    if suites.is_empty() {
        return Err(RunError::Usage(format!(
            "the pattern's InitializeResponse.interfaces is {interfaces:?}, which names no \
             service the kit checks ({:?} or {:?}); list the services it implements there, \
             or name the suites to run (--suite kv, pubsub or all)",
            trellis_proto::KEY_VALUE_SERVICE,
            trellis_proto::PUB_SUB_SERVICE
        )));
    }
    Ok(suites)
}

async fn connect(addr: &str, patience: Duration) -> Result<Channel, RunError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| {
        RunError::Usage(format!(
            "{addr:?} is not an address like http://127.0.0.1:9100: {}",
            chain(&e)
        ))
    })?;
    endpoint
        .tcp_nodelay(true)
        .connect_timeout(patience)
        .connect()
        .await
        .map_err(|e| {
            RunError::Connect(format!(
                "cannot connect to {url}: {}; is the pattern running and listening there?",
                chain(&e)
            ))
        })
}

/// An error with its sources, `: `-separated (tonic's own `Display` is terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn run_suites(
    channel: Channel,
    suites: &[Suite],
    options: &Options,
) -> Result<Vec<Report>, RunError> {
    check_names(&options.checks, suites)?;
    let mut reports = Vec::new();
    for &suite in suites {
        let names: Vec<&'static str> = suite
            .checks()
            .iter()
            .copied()
            .filter(|name| wants(&options.checks, suite.name(), name))
            .collect();
        if names.is_empty() {
            continue;
        }
        let (ns, other) = match &options.namespaces {
            Some((a, b)) => (a.clone(), b.clone()),
            None => {
                let (a, b) = suite.default_namespaces();
                (a.to_string(), b.to_string())
            }
        };
        let report = match suite {
            Suite::Kv => {
                let kit = kv::Kit::new(KeyValueClient::new(channel.clone()), ns, other)
                    .patience(options.patience);
                run_checks(suite.name(), &names, |name| {
                    noted(options, suite.name(), name, kv::run_one(&kit, name))
                })
                .await
            }
            Suite::PubSub => {
                let kit = pubsub::Kit::new(PubSubClient::new(channel.clone()), ns, other)
                    .patience(options.patience);
                run_checks(suite.name(), &names, |name| {
                    noted(options, suite.name(), name, pubsub::run_one(&kit, name))
                })
                .await
            }
        };
        reports.push(report);
    }
    Ok(reports)
}

/// Runs `check` and tells [`Options::progress`] its outcome.
async fn noted(
    options: &Options,
    suite: &'static str,
    name: &'static str,
    check: impl Future<Output = CheckResult>,
) -> CheckResult {
    let started = Instant::now();
    let result = check.await;
    if let Some(progress) = &options.progress {
        progress(
            suite,
            &Outcome {
                name,
                result: result.clone(),
                elapsed: started.elapsed(),
            },
        );
    }
    result
}

/// Is `check` of `suite` among those asked for?
fn wants(asked: &[String], suite: &str, check: &str) -> bool {
    asked.is_empty()
        || asked
            .iter()
            .any(|a| a == check || a.split_once('.') == Some((suite, check)))
}

/// Every name asked for is a check of one of `suites`.
fn check_names(asked: &[String], suites: &[Suite]) -> Result<(), RunError> {
    for a in asked {
        let known = suites.iter().any(|s| {
            s.checks()
                .iter()
                .any(|c| wants(std::slice::from_ref(a), s.name(), c))
        }) || wants(std::slice::from_ref(a), LIFECYCLE, STOP_CHECK);
        if known {
            continue;
        }
        let mut all: Vec<String> = Vec::new();
        for s in Suite::ALL {
            all.extend(s.checks().iter().map(|c| format!("{}.{c}", s.name())));
        }
        all.push(format!("{LIFECYCLE}.{STOP_CHECK}"));
        let elsewhere: Vec<&str> = Suite::ALL
            .iter()
            .filter(|s| {
                s.checks()
                    .iter()
                    .any(|c| wants(std::slice::from_ref(a), s.name(), c))
            })
            .map(|s| s.name())
            .collect();
        return Err(RunError::Usage(if elsewhere.is_empty() {
            format!(
                "no check is called {a:?}; the checks are {}",
                all.join(", ")
            )
        } else {
            format!(
                "the check {a:?} is in the {} suite, which is not being run (suites: {})",
                elsewhere.join(" and "),
                suites
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }));
    }
    Ok(())
}

/// One line per check, `PASS suite.name` or `FAIL suite.name: why` (lines
/// after the first of a long reason indented by two spaces), then
/// `N passed, M failed`.
pub fn text(reports: &[Report]) -> String {
    let mut out = String::new();
    for report in reports {
        for outcome in &report.outcomes {
            out.push_str(&outcome_line(report.suite, outcome));
            out.push('\n');
        }
    }
    out.push_str(&summary(reports));
    out.push('\n');
    out
}

/// The line of one outcome (see [`text`]).
pub fn outcome_line(suite: &str, outcome: &Outcome) -> String {
    match &outcome.result {
        Ok(()) => format!("PASS {suite}.{}", outcome.name),
        Err(why) => format!(
            "FAIL {suite}.{}: {}",
            outcome.name,
            why.trim_end().replace('\n', "\n  ")
        ),
    }
}

/// `N passed, M failed` over every report.
pub fn summary(reports: &[Report]) -> String {
    let failed: usize = reports.iter().map(|r| r.failed().count()).sum();
    let total: usize = reports.iter().map(|r| r.outcomes.len()).sum();
    format!("{} passed, {failed} failed", total - failed)
}

/// The reports as JUnit XML: a `<testsuite>` per suite, a `<testcase>` per
/// check (`classname` = the suite), a `<failure message="…">` with the
/// reason for each failed one. Built with `quick-junit` (nextest's), which
/// does the XML escaping.
pub fn junit(reports: &[Report]) -> Result<String, String> {
    use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};
    let mut xml = quick_junit::Report::new("trellis-conformance");
    for report in reports {
        let mut suite = TestSuite::new(report.suite);
        let mut time = Duration::ZERO;
        for outcome in &report.outcomes {
            let status = match &outcome.result {
                Ok(()) => TestCaseStatus::success(),
                Err(why) => {
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    s.set_message(why.as_str()).set_description(why.as_str());
                    s
                }
            };
            let mut case = TestCase::new(outcome.name, status);
            case.set_classname(report.suite).set_time(outcome.elapsed);
            time += outcome.elapsed;
            suite.add_test_case(case);
        }
        suite.set_time(time);
        xml.add_test_suite(suite);
    }
    xml.to_string()
        .map_err(|e| format!("cannot write the JUnit XML: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Vec<Report> {
        vec![Report {
            suite: "kv",
            outcomes: vec![
                Outcome {
                    name: "round_trip",
                    result: Ok(()),
                    elapsed: Duration::from_millis(2),
                },
                Outcome {
                    name: "list_order_and_pagination",
                    result: Err("want [\"a\", \"b\"] <ascending> & got \"b\"\nsecond line".into()),
                    elapsed: Duration::from_millis(1),
                },
            ],
        }]
    }

    #[test]
    fn text_has_a_line_per_check_and_a_summary() {
        let text = text(&report());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "PASS kv.round_trip");
        assert!(
            lines[1].starts_with("FAIL kv.list_order_and_pagination: want [\"a\""),
            "{text}"
        );
        assert_eq!(lines[2], "  second line");
        assert_eq!(lines[3], "1 passed, 1 failed");
    }

    #[test]
    fn junit_escapes_the_reason() {
        let xml = junit(&report()).unwrap();
        assert!(xml.contains("&lt;ascending&gt; &amp; got"), "{xml}");
        assert!(xml.contains("failures=\"1\""), "{xml}");
        assert!(!xml.contains("<ascending>"), "{xml}");
    }

    #[test]
    fn checks_are_named_plainly_or_by_suite() {
        let asked = vec!["round_trip".to_string(), "pubsub.fan_out".to_string()];
        assert!(wants(&asked, "kv", "round_trip"));
        assert!(wants(&asked, "pubsub", "fan_out"));
        assert!(!wants(&asked, "kv", "overwrite"));
        assert!(check_names(&asked, &Suite::ALL).is_ok());
        let err = check_names(&asked, &[Suite::Kv]).unwrap_err().to_string();
        assert!(err.contains("pubsub suite"), "{err}");
        let err = check_names(&["nope".into()], &Suite::ALL)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kv.round_trip"), "{err}");
    }

    #[test]
    fn suites_come_from_the_claimed_interfaces() {
        let kv_only = vec![trellis_proto::KEY_VALUE_SERVICE.to_string()];
        assert_eq!(claimed_suites(&kv_only).unwrap(), vec![Suite::Kv]);
        let err = claimed_suites(&["x.Y".into()]).unwrap_err().to_string();
        assert!(err.contains("--suite"), "{err}");
    }
}
