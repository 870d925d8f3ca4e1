//! The HTTP API keeps the promises of its OpenAPI document (issue 15):
//! Schemathesis, a property-based API tester, generates requests from
//! `GET /openapi.json` of the real proxy on its default config
//! (deploy/examples/local.yaml, the one `make run` serves) and checks every
//! answer with all of its checks. Any failure or error fails the test.
//!
//! Two runs, each on its own proxy, so one cannot break the other's
//! premise:
//! - the data and read surface (every operation but the streaming ones and
//!   the pattern lifecycle), with the pattern serving throughout;
//! - the pattern lifecycle (`:start`, `:stop`, `:restart`) with the reads
//!   that watch it: a stopped pattern answers data calls 503, which
//!   Schemathesis counts as a server error, so data calls stay out of it.
//!
//! Left out of both: `Subscribe` and `WatchPatterns` (streams; Schemathesis
//! waits for a response to end) and `Drain` (it ends the server under test;
//! tests/tests/drain.rs covers it).
//!
//! `TRELLIS_SCHEMATHESIS_SEED` (default 1; `random`: Schemathesis picks and
//! prints one) and `TRELLIS_SCHEMATHESIS_EXAMPLES` (default 40 per
//! operation) are how `make fuzz-http` looks further.

use std::io::Write;
use std::path::Path;

use tokio::process::Command;
use trellis_tests::Proxy;

const STREAMING_AND_DRAIN: &[&str] = &[
    "trellis.data.v1.PubSub.Subscribe",
    "trellis.admin.v1.Admin.WatchPatterns",
    "trellis.admin.v1.Admin.Drain",
];

const LIFECYCLE: &[&str] = &[
    "trellis.admin.v1.Admin.StartPattern",
    "trellis.admin.v1.Admin.StopPattern",
    "trellis.admin.v1.Admin.RestartPattern",
];

#[tokio::test]
async fn the_data_and_read_api_keeps_its_openapi_promises() {
    let mut args = Vec::new();
    for op in STREAMING_AND_DRAIN.iter().chain(LIFECYCLE) {
        args.extend(["--exclude-operation-id", op]);
    }
    schemathesis("data and reads", &args).await;
}

#[tokio::test]
async fn the_pattern_lifecycle_api_keeps_its_openapi_promises() {
    let mut args = Vec::new();
    for op in LIFECYCLE.iter().chain(&[
        "trellis.admin.v1.Admin.GetPattern",
        "trellis.admin.v1.Admin.ListPatterns",
    ]) {
        args.extend(["--include-operation-id", op]);
    }
    schemathesis("pattern lifecycle", &args).await;
}

/// Starts the proxy on the default config (on free ports) and runs
/// Schemathesis against it with `select`; panics with its report on any
/// failure. Prints the summary either way.
async fn schemathesis(run: &str, select: &[&str]) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let default_config = std::fs::read_to_string(root.join("deploy/examples/local.yaml"))
        .expect("deploy/examples/local.yaml");
    let proxy = Proxy::spawn_with(
        &default_config,
        &[
            ("TRELLIS_LISTEN__GRPC".into(), "127.0.0.1:0".into()),
            ("TRELLIS_LISTEN__HTTP".into(), "127.0.0.1:0".into()),
        ],
    )
    .await;
    proxy.wait_serving("").await;
    let base = proxy.http.clone().expect("the default config serves HTTP");

    let seed = std::env::var("TRELLIS_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let examples = std::env::var("TRELLIS_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into());
    let config = root.join("tests/schemathesis/schemathesis.toml");
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "schemathesis.cli", "--no-color", "--config-file"])
        .arg(&config)
        .args(["run", &format!("{base}/openapi.json"), "--checks", "all"])
        .args(["--max-examples", &examples, "--request-timeout", "30"])
        .args(["--suppress-health-check", "too_slow"])
        .args(select)
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .kill_on_drop(true);
    if seed != "random" {
        cmd.args(["--seed", &seed]);
    }
    let out = match cmd.output().await {
        Ok(o) => o,
        Err(e) => panic!("cannot run {python} ({e}): install Python 3, then run `make setup`"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named schemathesis") {
        panic!(
            "{python} lacks Schemathesis: run `make setup` (scripts/setup-backends.sh installs \
             it with pip)"
        );
    }
    // The summary, past the test harness's capture (which hides what
    // passing tests print): what was generated, with which seed.
    let summary = stdout
        .find("SUMMARY")
        .and_then(|at| stdout[..at].rfind('\n').map(|nl| &stdout[nl + 1..]))
        .unwrap_or(&stdout);
    let _ = writeln!(
        std::io::stderr(),
        "\nSchemathesis, {run}, on {base}:\n{summary}"
    );
    assert!(
        out.status.success(),
        "Schemathesis found failures or errors in the {run} run (exit {:?}); its report:\n{stdout}\n{stderr}\nthe proxy's log:\n{}",
        out.status.code(),
        proxy.log_text()
    );
    // Whatever it sent, the proxy is still up and answering.
    let alive = trellis_tests::http::get(&format!("{base}/livez")).await;
    assert_eq!(alive.status, http::StatusCode::OK, "{}", alive.text());
}
