//! `trellis-conformance`, the real binary: it passes every pattern in the
//! repo when it spawns them (`--command`, with a `--config` file for the
//! ones that need a backend), passes a running pattern (`--addr`), fails
//! with exit 1 and a line naming what was expected and seen on a pattern
//! that lists in the wrong order (trellis-chaos `list_order: reversed`)
//! and on one that stores an empty key (a copy of the Python example with
//! that check taken out; the SDK validates before an SDK pattern sees a
//! request, so trellis-chaos cannot skip it), writes JUnit XML that parses with the right counts, and exits 2 with a
//! message saying what to fix when nothing can be checked.

use std::path::Path;
use std::process::Stdio;

use pattern_sdk::conformance::kv::PatternProcess;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis_tests::backends::{PostgresServer, RedisServer};
use trellis_tests::nats::NatsServer;
use trellis_tests::{PATIENCE, bin};

/// What one run of the command gave.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The `PASS …` / `FAIL …` lines (a long reason's continuation lines,
    /// indented, are not lines of their own).
    fn check_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL "))
            .collect()
    }

    fn summary(&self) -> &str {
        self.stdout.lines().last().unwrap_or_default()
    }

    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Exit 0, every check line PASS, and the summary says none failed.
    #[track_caller]
    fn assert_all_passed(&self) {
        let lines = self.check_lines();
        assert_eq!(self.code, Some(0), "{}", self.show());
        assert!(!lines.is_empty(), "{}", self.show());
        assert!(
            lines.iter().all(|l| l.starts_with("PASS ")),
            "{}",
            self.show()
        );
        assert_eq!(
            self.summary(),
            format!("{} passed, 0 failed", lines.len()),
            "{}",
            self.show()
        );
    }
}

/// Runs `trellis-conformance` with `args` (and `env` added), bounded so a
/// hang fails the test instead of stalling it.
async fn conformance(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(bin("trellis-conformance"));
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(PATIENCE * 5, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("trellis-conformance {args:?} took over {:?}", PATIENCE * 5))
        .expect("run trellis-conformance");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// A `--config` file holding `yaml`.
fn config_file(dir: &tempfile::TempDir, yaml: &str) -> std::path::PathBuf {
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, yaml).expect("write the config file");
    file
}

const PATIENCE_ARG: &str = "60s";

#[tokio::test]
async fn memstore_passes_both_suites_it_claims_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(&dir, "sweep_interval: 100ms\n");
    let memstore = bin("trellis-memstore");
    let run = conformance(
        &[
            "--command",
            path(&memstore),
            "--config",
            path(&config),
            "--patience",
            PATIENCE_ARG,
        ],
        &[],
    )
    .await;
    run.assert_all_passed();
    let lines = run.check_lines();
    // Both suites, chosen from InitializeResponse.interfaces, and the stop.
    for want in [
        "PASS kv.round_trip",
        "PASS kv.list_order_and_pagination",
        "PASS pubsub.fan_out",
        "PASS lifecycle.stop",
    ] {
        assert!(lines.contains(&want), "no {want:?}:\n{}", run.show());
    }
    assert_eq!(
        lines.len(),
        pattern_sdk::conformance::kv::CHECKS.len()
            + pattern_sdk::conformance::pubsub::CHECKS.len()
            + 1,
        "{}",
        run.show()
    );
}

#[tokio::test]
async fn redis_passes_with_its_url_in_the_config_file() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(&dir, &format!("url: {:?}\n", redis.url()));
    let run = conformance(
        &[
            "--command",
            path(&bin("trellis-redis")),
            "--config",
            path(&config),
            "--patience",
            PATIENCE_ARG,
        ],
        &[],
    )
    .await;
    run.assert_all_passed();
    assert!(
        run.check_lines().contains(&"PASS kv.ttl_expiry"),
        "{}",
        run.show()
    );
}

#[tokio::test]
async fn postgres_passes_with_its_url_in_the_config_file() {
    let pg = PostgresServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(
        &dir,
        &format!("url: {:?}\npurge_interval: 200ms\n", pg.url()),
    );
    let run = conformance(
        &[
            "--command",
            path(&bin("trellis-postgres")),
            "--config",
            path(&config),
            "--patience",
            PATIENCE_ARG,
        ],
        &[],
    )
    .await;
    run.assert_all_passed();
    assert!(
        run.check_lines().contains(&"PASS kv.list_concurrent_adds"),
        "{}",
        run.show()
    );
}

#[tokio::test]
async fn nats_passes_the_pubsub_suite() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(
        &dir,
        &format!("url: {:?}\nconnect_timeout: 2s\n", nats.url()),
    );
    let run = conformance(
        &[
            "--command",
            path(&bin("trellis-nats")),
            "--config",
            path(&config),
            "--patience",
            PATIENCE_ARG,
        ],
        &[],
    )
    .await;
    if run.code != Some(0) {
        panic!("{}\nnats-server log:\n{}", run.show(), nats.log());
    }
    run.assert_all_passed();
    let lines = run.check_lines();
    assert!(
        lines.contains(&"PASS pubsub.queue_groups"),
        "{}",
        run.show()
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("PASS kv.")),
        "nats serves no KeyValue:\n{}",
        run.show()
    );
}

/// `--addr`: a memstore started by someone else (here the kit's own
/// `PatternProcess`) is checked and left running.
#[tokio::test]
async fn a_running_pattern_is_checked_by_address_and_left_running() {
    let pattern = PatternProcess::spawn_with_patience(
        &bin("trellis-memstore"),
        "mem",
        serde_json::json!({ "sweep_interval": "100ms" }),
        PATIENCE,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = format!("http://{}", pattern.addr());
    let run = conformance(
        &["--addr", &addr, "--suite", "kv", "--patience", PATIENCE_ARG],
        &[],
    )
    .await;
    run.assert_all_passed();
    let lines = run.check_lines();
    assert_eq!(
        lines.len(),
        pattern_sdk::conformance::kv::CHECKS.len(),
        "only the kv checks, no lifecycle check on a pattern it did not start:\n{}",
        run.show()
    );
    let status = HealthClient::new(pattern.channel())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check after the run")
        .into_inner()
        .status();
    assert_eq!(
        status,
        ServingStatus::Serving,
        "the pattern was left serving"
    );
    assert!(
        pattern
            .stop(std::time::Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        "memstore exits 0 after Stop"
    );
}

/// The checks the broken-pattern runs ask for: one the chaos pattern
/// passes, one it fails.
const BROKEN_CHECKS: [&str; 4] = [
    "--check",
    "round_trip",
    "--check",
    "kv.list_order_and_pagination",
];

fn chaos_reversed(dir: &tempfile::TempDir) -> std::path::PathBuf {
    config_file(dir, "list_order: reversed\n")
}

#[tokio::test]
async fn a_pattern_listing_in_the_wrong_order_fails_naming_want_and_got() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = chaos_reversed(&dir);
    let chaos = bin("trellis-chaos");
    let mut args = vec!["--command", path(&chaos), "--config", path(&config)];
    args.extend(BROKEN_CHECKS);
    let run = conformance(&args, &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let lines = run.check_lines();
    assert_eq!(lines.len(), 2, "{}", run.show());
    assert_eq!(lines[0], "PASS kv.round_trip", "{}", run.show());
    let fail = lines[1];
    assert!(
        fail.starts_with("FAIL kv.list_order_and_pagination: List(prefix "),
        "{}",
        run.show()
    );
    // What was expected (ascending byte order) and what was seen (the
    // keys as listed, the largest first).
    let (want, got) = fail
        .split_once(", got ")
        .unwrap_or_else(|| panic!("no \", got \" in {fail:?}"));
    assert!(want.contains("want [") && want.contains("ascending byte order"));
    let first_got = got.trim_start_matches('[').split(", ").next().unwrap_or("");
    let first_want = want
        .split_once("want [")
        .map(|(_, w)| w.split(", ").next().unwrap_or(""))
        .unwrap_or("");
    assert_ne!(first_got, first_want, "{fail}");
    assert_eq!(run.summary(), "1 passed, 1 failed", "{}", run.show());
}

#[tokio::test]
async fn junit_output_parses_with_a_testcase_per_check_and_the_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = chaos_reversed(&dir);
    let chaos = bin("trellis-chaos");
    let mut args = vec![
        "--command",
        path(&chaos),
        "--config",
        path(&config),
        "--format",
        "junit",
    ];
    args.extend(BROKEN_CHECKS);
    let run = conformance(&args, &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let xml = roxmltree::Document::parse(&run.stdout)
        .unwrap_or_else(|e| panic!("the JUnit output is not XML: {e}\n{}", run.show()));
    let root = xml.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    assert_eq!(root.attribute("tests"), Some("2"), "{}", run.stdout);
    assert_eq!(root.attribute("failures"), Some("1"), "{}", run.stdout);
    let suites: Vec<_> = root
        .children()
        .filter(|n| n.has_tag_name("testsuite"))
        .collect();
    assert_eq!(suites.len(), 1, "{}", run.stdout);
    assert_eq!(suites[0].attribute("name"), Some("kv"));
    let cases: Vec<_> = suites[0]
        .children()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    let names: Vec<_> = cases.iter().filter_map(|c| c.attribute("name")).collect();
    assert_eq!(names, ["round_trip", "list_order_and_pagination"]);
    let failures: Vec<_> = cases
        .iter()
        .flat_map(|c| c.children().filter(|n| n.has_tag_name("failure")))
        .collect();
    assert_eq!(failures.len(), 1, "{}", run.stdout);
    let message = failures[0].attribute("message").unwrap_or_default();
    // The kit's reason, quotes and all, came through the escaping intact.
    assert!(
        message.starts_with("List(prefix \"ck/") && message.contains("ascending byte order"),
        "{message}"
    );
    assert!(
        run.stderr.contains("FAIL kv.list_order_and_pagination"),
        "the lines go to stderr beside XML on stdout:\n{}",
        run.show()
    );
}

/// A pattern that does not exit after `Lifecycle/Stop` (trellis-chaos
/// `ignore_sigterm: true`, whose stop hangs) fails `lifecycle.stop`, and the
/// command still ends: it kills the pattern after the grace + 5 s.
#[tokio::test]
async fn a_pattern_that_ignores_stop_fails_the_stop_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(&dir, "ignore_sigterm: true\n");
    let chaos = bin("trellis-chaos");
    let run = conformance(
        &[
            "--command",
            path(&chaos),
            "--config",
            path(&config),
            "--check",
            "round_trip",
            "--check",
            "lifecycle.stop",
            "--stop-grace",
            "1s",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let lines = run.check_lines();
    assert_eq!(lines.len(), 2, "{}", run.show());
    assert_eq!(lines[0], "PASS kv.round_trip", "{}", run.show());
    assert!(
        lines[1].starts_with("FAIL lifecycle.stop: after Lifecycle/Stop(grace 1s) want exit 0"),
        "{}",
        run.show()
    );
    assert_eq!(run.summary(), "1 passed, 1 failed", "{}", run.show());
}

#[tokio::test]
async fn nothing_to_check_exits_2_saying_what_to_fix() {
    // A command that does not exist.
    let run = conformance(&["--command", "/nonexistent/my-pattern"], &[]).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(
        run.stderr.contains("/nonexistent/my-pattern") && run.stderr.contains("no such file"),
        "{}",
        run.show()
    );
    // A first stdout line that is not a handshake: quoted.
    let chaos = bin("trellis-chaos");
    let run = conformance(
        &["--command", path(&chaos), "--patience", PATIENCE_ARG],
        &[("CHAOS_BAD_HANDSHAKE", "1")],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(
        run.stderr.contains("hello, I am not a handshake") && run.stderr.contains("TRELLIS|1|tcp|"),
        "{}",
        run.show()
    );
    // A running pattern is not asked what it serves: --suite is needed.
    let run = conformance(&["--addr", "http://127.0.0.1:1"], &[]).await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(run.stderr.contains("--suite"), "{}", run.show());
    // A check that does not exist names the ones that do.
    let run = conformance(
        &[
            "--addr",
            "http://127.0.0.1:1",
            "--suite",
            "kv",
            "--check",
            "nope",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.show());
    assert!(run.stderr.contains("kv.round_trip"), "{}", run.show());
}

/// A copy of the Python example (`examples/python-kv/`) with one line of
/// validation taken out: it stores an empty key instead of refusing it.
/// Laid out like the repo (the launcher finds `../../proto`), in `dir`.
fn python_accepting_empty_keys(dir: &tempfile::TempDir) -> std::path::PathBuf {
    // Checks that Python can run the example at all.
    trellis_tests::python_example();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = repo.join("examples/python-kv");
    let copy = dir.path().join("examples/python-kv");
    std::fs::create_dir_all(&copy).expect("create the copy's folder");
    std::os::unix::fs::symlink(repo.join("proto"), dir.path().join("proto"))
        .expect("link proto/ next to the copy");
    let launcher = copy.join("trellis-python-kv");
    // fs::copy keeps the executable bit.
    std::fs::copy(example.join("trellis-python-kv"), &launcher).expect("copy the launcher");
    let source = std::fs::read_to_string(example.join("pattern.py")).expect("read pattern.py");
    let check = "    if not key:\n        raise Invalid(\"key\", \"must not be empty\")\n";
    assert!(
        source.contains(check),
        "examples/python-kv/pattern.py no longer has the line this test removes:\n{check}"
    );
    std::fs::write(copy.join("pattern.py"), source.replacen(check, "", 1))
        .expect("write the broken pattern.py");
    launcher
}

/// The kit fails a pattern that does not do the validation it owns: a
/// pattern that stores an empty key fails `kv.invalid_empty_key`, with a
/// line naming what was expected (INVALID_ARGUMENT naming `key`) and what
/// was seen (success), and passes the check it does not break.
#[tokio::test]
async fn a_pattern_accepting_an_empty_key_fails_the_validation_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = python_accepting_empty_keys(&dir);
    let run = conformance(
        &[
            "--command",
            path(&launcher),
            "--patience",
            PATIENCE_ARG,
            "--check",
            "round_trip",
            "--check",
            "kv.invalid_empty_key",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.show());
    let lines = run.check_lines();
    assert_eq!(lines.len(), 2, "{}", run.show());
    assert_eq!(lines[0], "PASS kv.round_trip", "{}", run.show());
    assert_eq!(
        lines[1],
        "FAIL kv.invalid_empty_key: Put with an empty key: want InvalidArgument naming \
         \"key\", got success ()",
        "{}",
        run.show()
    );
    assert_eq!(run.summary(), "1 passed, 1 failed", "{}", run.show());
}
