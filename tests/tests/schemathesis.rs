//! The HTTP API keeps the promises of its OpenAPI document (issue 15):
//! Schemathesis, a property-based API tester, generates requests from
//! `GET /openapi.json` of the real proxy on its default config
//! (deploy/examples/local.yaml, the one `make run` serves) and checks every
//! answer with all of its checks. Any failure or error fails the test.
//!
//! Two runs, one per door, each on its own proxy, so one cannot break the
//! other's premise:
//! - the data door (`listen.http`, its own `/openapi.json`), with the
//!   pattern serving throughout;
//! - the admin door (`listen.admin`): the pattern lifecycle (`:start`,
//!   `:stop`, `:restart`), reload and the reads that watch them. A stopped
//!   pattern answers data calls 503, which Schemathesis counts as a server
//!   error: that is why the data calls run on a proxy nobody stops.
//!
//! Left out: `Subscribe` and `WatchPatterns` (streams; Schemathesis waits
//! for a response to end) and `Drain` (it ends the server under test;
//! tests/tests/drain.rs covers it).
//!
//! `TRELLIS_SCHEMATHESIS_SEED` (default 1; `random`: Schemathesis picks and
//! prints one) and `TRELLIS_SCHEMATHESIS_EXAMPLES` (default 40 per
//! operation) are how `make fuzz-http` looks further.

use std::io::Write;
use std::path::Path;

use tokio::process::Command;
use trellis_tests::Proxy;

/// The doors a run can target.
#[derive(Clone, Copy)]
enum Door {
    Data,
    Admin,
}

#[tokio::test]
async fn the_data_api_keeps_its_openapi_promises() {
    schemathesis(
        Door::Data,
        &["--exclude-operation-id", "trellis.data.v1.PubSub.Subscribe"],
    )
    .await;
}

#[tokio::test]
async fn the_admin_api_keeps_its_openapi_promises() {
    schemathesis(
        Door::Admin,
        &[
            "--exclude-operation-id",
            "trellis.admin.v1.Admin.WatchPatterns",
            "--exclude-operation-id",
            "trellis.admin.v1.Admin.Drain",
        ],
    )
    .await;
}

/// Starts the proxy on the default config (on free ports) and runs
/// Schemathesis against `door` with `select`; panics with its report on
/// any failure. Prints the summary either way.
async fn schemathesis(door: Door, select: &[&str]) {
    let run = match door {
        Door::Data => "the data door",
        Door::Admin => "the admin door",
    };
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let default_config = std::fs::read_to_string(root.join("deploy/examples/local.yaml"))
        .expect("deploy/examples/local.yaml");
    let proxy = Proxy::spawn_with(
        &default_config,
        &[
            ("TRELLIS_LISTEN__GRPC".into(), "127.0.0.1:0".into()),
            ("TRELLIS_LISTEN__HTTP".into(), "127.0.0.1:0".into()),
            ("TRELLIS_LISTEN__ADMIN".into(), "127.0.0.1:0".into()),
        ],
    )
    .await;
    proxy.wait_serving("").await;
    let base = match door {
        Door::Data => proxy.http.clone(),
        Door::Admin => proxy.admin.clone(),
    }
    .expect("the default config opens both doors");

    let seed = std::env::var("TRELLIS_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let examples = std::env::var("TRELLIS_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into());
    let config = root.join("tests/schemathesis/schemathesis.toml");
    let work = trellis_tests::target_dir().join("schemathesis");
    std::fs::create_dir_all(&work).expect("target/debug/schemathesis");
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "schemathesis.cli", "--no-color", "--config-file"])
        .arg(&config)
        .args(["run", &format!("{base}/openapi.json"), "--checks", "all"])
        .args(["--max-examples", &examples, "--request-timeout", "30"])
        .args(["--suppress-health-check", "too_slow"])
        .args(select)
        .env("SCHEMATHESIS_TELEMETRY", "false")
        // Its cache of failures found (replayed first next time) lives
        // with the build, not in the source tree.
        .current_dir(&work)
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
