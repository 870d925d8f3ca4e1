//! Hostile traffic-policy configuration is refused before anything starts:
//! the real `trellis` binary, given a policy with every field out of
//! range, exits with the config-error status and names the file, each
//! field by its full dotted path, and what is allowed.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use trellis_tests::{PATIENCE, bin};

/// The exit status `trellis` uses for a configuration it refuses.
const CONFIG_ERROR: i32 = 2;

/// One policy, `p`, with every field out of range, and a namespace that
/// names a policy nobody defined.
const HOSTILE: &str = r#"
listen: {grpc: "127.0.0.1:0", http: null}
patterns:
  - {name: mem, command: trellis-memstore}
policies:
  p:
    timeout: 0s
    method_timeouts: {Nope: 1s}
    retries:
      max_attempts: 6
      initial_backoff: 0s
      multiplier: 0.5
      jitter: 2.0
      retryable_codes: [NOT_A_CODE]
      idempotent_methods: [Drop]
      budget: {ratio: 1.5, window: 0s}
    circuit_breaker:
      consecutive_failures: 0
      failure_ratio: 0
      window: 0s
      open_for: 0s
      probes: 0
    concurrency: {max_in_flight: 0, queue: 5, queue_timeout: 0s}
    rate_limit: {per_second: 0, burst: 0, caller_key: "Bad Key"}
namespaces:
  - {name: ok, pattern: mem, policy: p}
  - {name: lost, pattern: mem, policy: nowhere}
"#;

/// Each field `validate` must name, with a piece of the allowed range or
/// rule it must state.
const EXPECTED: &[(&str, &str)] = &[
    ("policies.p.timeout", "must be greater than zero"),
    (
        "policies.p.method_timeouts.Nope",
        "allowed: Get, Put, Delete, List, Publish, Subscribe",
    ),
    ("policies.p.retries.max_attempts", "1 (no retries) to 5"),
    (
        "policies.p.retries.initial_backoff",
        "must be greater than zero",
    ),
    ("policies.p.retries.multiplier", "1.0 to 10.0"),
    ("policies.p.retries.jitter", "0.0 to 1.0"),
    (
        "policies.p.retries.retryable_codes[0]",
        "is not a gRPC status code name",
    ),
    (
        "policies.p.retries.idempotent_methods[0]",
        "allowed: Get, Put, Delete, List, Publish, Subscribe",
    ),
    ("policies.p.retries.budget.ratio", "0.0 to 1.0"),
    ("policies.p.retries.budget.window", "1s to 60s"),
    (
        "policies.p.circuit_breaker.consecutive_failures",
        "at least 1",
    ),
    (
        "policies.p.circuit_breaker.failure_ratio",
        "above 0.0, up to 1.0",
    ),
    (
        "policies.p.circuit_breaker.window",
        "must be greater than zero",
    ),
    (
        "policies.p.circuit_breaker.open_for",
        "must be greater than zero",
    ),
    ("policies.p.circuit_breaker.probes", "at least 1"),
    ("policies.p.concurrency.max_in_flight", "at least 1"),
    (
        "policies.p.concurrency.queue_timeout",
        "allowed: up to 1h (when queue > 0)",
    ),
    ("policies.p.rate_limit.per_second", "at least 1"),
    ("policies.p.rate_limit.burst", "at least 1"),
    (
        "policies.p.rate_limit.caller_key",
        "not a usable metadata key",
    ),
    ("namespaces[1].policy", "no policy is named \"nowhere\""),
];

/// Runs `trellis` with `args` and returns its output. A config that is
/// (wrongly) accepted would make `--config` serve forever: it is killed
/// after [`PATIENCE`] and the test fails, instead of hanging.
fn trellis(args: &[&str]) -> Output {
    let mut child = Command::new(bin("trellis"))
        .args(args)
        .env_remove("TRELLIS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run trellis");
    let started = Instant::now();
    while child.try_wait().expect("wait for trellis").is_none() {
        if started.elapsed() > PATIENCE {
            child.kill().expect("kill trellis");
            let out = child.wait_with_output().expect("reap trellis");
            panic!(
                "trellis {args:?} did not exit: the config was accepted; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("trellis output")
}

fn write(dir: &Path, name: &str, yaml: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    file.to_str().unwrap().to_string()
}

/// The problem line for `field`: `  - <field>: <message>`.
fn line_for<'a>(stderr: &'a str, field: &str) -> Option<&'a str> {
    let prefix = format!("- {field}: ");
    stderr.lines().find(|l| l.trim_start().starts_with(&prefix))
}

#[test]
fn every_out_of_range_policy_field_is_named_with_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "hostile.yaml", HOSTILE);
    for args in [vec!["--config", &file], vec!["check-config", &file]] {
        let out = trellis(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(CONFIG_ERROR), "{args:?}: {err}");
        assert!(err.contains(&file), "{args:?}: names the file: {err}");
        for (field, allowed) in EXPECTED {
            let line = line_for(&err, field)
                .unwrap_or_else(|| panic!("{args:?}: {field} is not named: {err}"));
            assert!(
                line.contains(allowed),
                "{args:?}: {field} should say {allowed:?}: {line}"
            );
        }
        // Every problem at once, and the count in the heading agrees.
        assert!(
            err.contains(&format!("({} problems)", EXPECTED.len())),
            "{args:?}: one problem per field, all at once: {err}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?}: nothing on stdout: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn an_unknown_field_inside_a_policy_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, field, typo, suggestion) in [
        (
            "policies:\n  p:\n    retries: {max_attempt: 3}\n",
            "policies.p.retries.max_attempt",
            "max_attempt",
            "max_attempts",
        ),
        (
            "policies:\n  p:\n    retries: {budget: {ratios: 0.1}}\n",
            "policies.p.retries.budget.ratios",
            "ratios",
            "ratio",
        ),
        (
            "policies:\n  p:\n    circuit_breaker: {open: 5s}\n",
            "policies.p.circuit_breaker.open",
            "open",
            "open_for",
        ),
        (
            "policies:\n  p:\n    rate_limit: {per_sec: 5}\n",
            "policies.p.rate_limit.per_sec",
            "per_sec",
            "per_second",
        ),
        (
            "policies:\n  p:\n    timeouts: 5s\n",
            "policies.p.timeouts",
            "timeouts",
            "method_timeouts",
        ),
    ] {
        let file = write(dir.path(), "typo.yaml", yaml);
        let out = trellis(&["--config", &file]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(CONFIG_ERROR), "{yaml}: {err}");
        assert!(err.contains(&file), "names the file: {err}");
        let line = line_for(&err, field).unwrap_or_else(|| panic!("{field} is not named: {err}"));
        assert!(
            line.contains(&format!("`{typo}`")),
            "names the unknown field: {line}"
        );
        assert!(
            line.contains(&format!("`{suggestion}`")),
            "lists the allowed fields: {line}"
        );
    }
}
