//! The Python example pattern (`examples/python-kv/`, written from
//! docs/pattern-protocol.md alone) run by the real proxy and by the
//! conformance kit: the protocol really is language-neutral.
//!
//! Needs python3 with grpcio, grpcio-tools and grpcio-health-checking
//! (`make setup` installs them); without them every test fails saying so.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pattern_sdk::conformance::kv::{self, Kit, PatternProcess};
use tonic::Code;
use trellis_proto::KEY_VALUE_SERVICE;
use trellis_proto::admin::v1::PatternState;
use trellis_proto::data::v1::{DeleteRequest, GetRequest, ListRequest, PutRequest};
use trellis_tests::{PATIENCE, PatternEntry, Proxy, children_of, eventually, process_gone, state};

const NS: &str = "py";
const OTHER: &str = "py-other";

fn launcher() -> PathBuf {
    trellis_tests::python_example()
}

/// A proxy running the Python pattern for [`NS`] and [`OTHER`], SERVING.
async fn proxy() -> Proxy {
    // Python and grpcio take a while to import on a busy machine: a wide
    // start-up bound, which only matters if something is broken.
    Proxy::builder()
        .pattern(PatternEntry::new("py", launcher(), &[NS, OTHER]))
        .with("startup_timeout: 60s")
        .start()
        .await
}

/// The proxy's direct child is Python itself (the launcher `exec`s it), so
/// the proxy's signals and PR_SET_PDEATHSIG reach the pattern.
fn assert_is_python(pid: u32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("python") && cmdline.contains("pattern.py"),
        "the pattern's process {pid} is not python running pattern.py: {cmdline:?}"
    );
}

#[tokio::test]
async fn serves_key_value_calls_through_the_proxy() {
    let proxy = proxy().await;
    let p = proxy.pattern("py").await;
    assert_eq!(state(&p), PatternState::Serving);
    assert_eq!(p.interfaces, [KEY_VALUE_SERVICE]);
    assert_eq!(p.version, "0.1.0");
    assert_eq!(proxy.children(), [p.pid]);
    assert_is_python(p.pid);
    proxy.wait_serving(NS).await;

    let mut kv = proxy.kv().await;
    for (key, value) in [
        ("fruit/b", "banana"),
        ("fruit/a", "apple"),
        ("veg/c", "carrot"),
    ] {
        kv.put(PutRequest {
            namespace: NS.into(),
            key: key.into(),
            value: value.into(),
            ttl: None,
        })
        .await
        .expect("Put through the proxy");
    }
    let got = kv
        .get(GetRequest {
            namespace: NS.into(),
            key: "fruit/a".into(),
        })
        .await
        .expect("Get through the proxy");
    assert_eq!(got.into_inner().value, b"apple");

    let page = kv
        .list(ListRequest {
            namespace: NS.into(),
            prefix: "fruit/".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("List")
        .into_inner();
    let keys: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["fruit/a"]);
    assert!(!page.next_page_token.is_empty(), "a second page follows");
    let rest = kv
        .list(ListRequest {
            namespace: NS.into(),
            prefix: "fruit/".into(),
            page_size: 10,
            page_token: page.next_page_token,
        })
        .await
        .expect("List, second page")
        .into_inner();
    let keys: Vec<&str> = rest.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["fruit/b"]);
    assert_eq!(rest.next_page_token, "", "the last page has no token");

    let deleted = kv
        .delete(DeleteRequest {
            namespace: NS.into(),
            key: "fruit/a".into(),
        })
        .await
        .expect("Delete")
        .into_inner();
    assert!(deleted.deleted);
    let gone = kv
        .get(GetRequest {
            namespace: NS.into(),
            key: "fruit/a".into(),
        })
        .await
        .expect_err("Get after Delete");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // The proxy forwards unchecked: the pattern's own validation answers.
    let bad = kv
        .put(PutRequest {
            namespace: NS.into(),
            key: String::new(),
            value: b"v".to_vec(),
            ttl: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        })
        .await
        .expect_err("Put with an empty key");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("key"), "{bad:?}");
    let bad = kv
        .list(ListRequest {
            namespace: NS.into(),
            prefix: String::new(),
            page_size: -1,
            page_token: String::new(),
        })
        .await
        .expect_err("List with a negative page_size");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("page_size"), "{bad:?}");
}

/// Over `transport: tcp`, the Python pattern refuses a call around the
/// proxy (no `trellis-pattern-secret`) with UNAUTHENTICATED, health checks
/// included, and serves the proxy's; by default it listens on the Unix
/// socket the proxy gave it.
#[tokio::test]
async fn refuses_calls_without_the_pattern_secret() {
    let on_unix = proxy().await;
    let p = on_unix.pattern("py").await;
    assert!(p.endpoint.starts_with("unix:///"), "{}", p.endpoint);
    drop(on_unix);

    let proxy = Proxy::builder()
        .pattern(PatternEntry::new("py", launcher(), &[NS, OTHER]))
        .with("startup_timeout: 60s")
        .with("transport: tcp")
        .start()
        .await;
    let p = proxy.pattern("py").await;
    let addr = p.endpoint.strip_prefix("tcp://").expect("a tcp endpoint");
    let direct = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = trellis_proto::data::v1::key_value_client::KeyValueClient::new(direct.clone())
        .get(GetRequest {
            namespace: NS.into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = tonic_health::pb::health_client::HealthClient::new(direct)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    proxy
        .kv()
        .await
        .put(PutRequest {
            namespace: NS.into(),
            key: "k".into(),
            value: b"v".to_vec(),
            ttl: None,
        })
        .await
        .expect("the proxy's call is served");
}

#[tokio::test]
async fn conforms_through_the_proxy() {
    let proxy = proxy().await;
    let kit = Kit::connect(proxy.addr.clone(), NS, OTHER)
        .await
        .expect("connect to the proxy")
        .patience(PATIENCE);
    let report = kv::run_all(&kit).await;
    println!("{report}");
    assert!(
        report.all_passed(),
        "conformance checks failed:\n{report}\nproxy log:\n{}",
        proxy.log_text()
    );
}

#[tokio::test]
async fn conforms_as_a_bare_pattern() {
    let pattern = PatternProcess::spawn_with_patience(
        &launcher(),
        "py",
        serde_json::json!({ "max_keys": 100000 }),
        PATIENCE,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let kit = Kit::new(pattern.kv(), NS, OTHER).patience(PATIENCE);
    let report = kv::run_all(&kit).await;
    println!("{report}");
    report.assert_all_passed();
    assert!(
        pattern.stop(Duration::from_secs(5)).await.unwrap(),
        "the Python pattern exits 0 after Lifecycle/Stop"
    );
}

#[tokio::test]
async fn kill_9_of_python_is_restarted_and_serves_again() {
    let proxy = proxy().await;
    let first = proxy.pattern("py").await;
    assert_is_python(first.pid);
    kill(Pid::from_raw(first.pid as i32), Signal::SIGKILL).expect("SIGKILL the pattern");

    let again = proxy
        .wait_pattern("py", "a new Python process, SERVING", |p| {
            p.pid != 0 && p.pid != first.pid && state(p) == PatternState::Serving
        })
        .await;
    assert!(again.restarts >= 1, "{again:?}");
    assert!(process_gone(first.pid), "the killed process was reaped");
    assert_eq!(proxy.children(), [again.pid]);
    assert_is_python(again.pid);

    // It serves again through the proxy (a fresh, empty store).
    let kv = proxy.kv().await;
    eventually("a Put and Get through the restarted pattern", || {
        let mut kv = kv.clone();
        async move {
            kv.put(PutRequest {
                namespace: NS.into(),
                key: "after-restart".into(),
                value: b"yes".to_vec(),
                ttl: None,
            })
            .await
            .ok()?;
            let got = kv
                .get(GetRequest {
                    namespace: NS.into(),
                    key: "after-restart".into(),
                })
                .await
                .ok()?;
            (got.into_inner().value == b"yes").then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn sigterm_to_the_proxy_stops_python_cleanly() {
    let mut proxy = proxy().await;
    let pid = proxy.pattern("py").await.pid;
    assert_eq!(proxy.children(), [pid]);
    assert_is_python(pid);
    // The proxy's whole process tree: its children and theirs.
    let mut tree = Vec::new();
    let mut parents = vec![proxy.pid()];
    while let Some(parent) = parents.pop() {
        let kids = children_of(parent);
        tree.extend(&kids);
        parents.extend(kids);
    }

    assert_eq!(proxy.terminate().await, Some(0), "{}", proxy.log_text());
    for process in tree {
        assert!(
            process_gone(process),
            "process {process} outlived the proxy"
        );
    }
    // Stopped through the protocol (Lifecycle/Stop), not killed: the proxy
    // logs the pattern's exit status.
    let exit_of = |logs: &str| {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| {
                let f = v.get("fields")?;
                (f.get("message")?.as_str()? == "stopped" && f.get("pid")?.as_u64()? == pid as u64)
                    .then(|| f.get("exit").and_then(|e| e.as_str()).map(str::to_string))
                    .flatten()
            })
    };
    // The proxy has exited; its last lines may still be on their way
    // through the pipe to the harness's reader.
    let exit = eventually("the pattern's exit in the proxy's log", || {
        let exit = exit_of(&proxy.log_text());
        async move { exit }
    })
    .await;
    let logs = proxy.log_text();
    assert_eq!(
        exit.as_str(),
        "exit code 0",
        "the Python pattern should exit 0 after Lifecycle/Stop; proxy log:\n{logs}"
    );
    assert!(
        logs.contains("Lifecycle/Stop"),
        "the pattern logs the Stop it got; proxy log:\n{logs}"
    );
}

/// The command pattern authors in any language run: `trellis-conformance
/// --command` spawns the Python pattern as the proxy does and passes.
#[tokio::test]
async fn trellis_conformance_passes_on_the_python_pattern() {
    let launcher = launcher();
    let out = tokio::process::Command::new(trellis_tests::bin("trellis-conformance"))
        .arg("--command")
        .arg(&launcher)
        .args(["--patience", "60s"])
        .output()
        .await
        .expect("run trellis-conformance");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("PASS kv.round_trip"), "{stdout}");
    assert!(stdout.contains("PASS lifecycle.stop"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
