//! The walking skeleton end to end: the real `trellis` supervising real
//! `trellis-memstore` processes.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1::{ListPatternsRequest, PatternState, exit_status};
use trellis_proto::data::v1::*;
use trellis_tests::kv::{get, put};
use trellis_tests::{Proxy, bin, eventually, process_gone};

#[tokio::test]
async fn kv_round_trip_through_the_proxy() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let mut kv = proxy.kv().await;

    kv.put(put("default", "greeting", b"hello")).await.unwrap();
    let got = kv
        .get(get("default", "greeting"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"hello");

    // Overwrite, binary and empty values.
    kv.put(put("default", "greeting", &[0, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(
        kv.get(get("default", "greeting"))
            .await
            .unwrap()
            .into_inner()
            .value,
        vec![0, 159, 146, 150]
    );
    kv.put(put("default", "empty", b"")).await.unwrap();
    assert_eq!(
        kv.get(get("default", "empty"))
            .await
            .unwrap()
            .into_inner()
            .value,
        b""
    );

    // Keys may contain '/'.
    kv.put(put("default", "a/b/c", b"slashes")).await.unwrap();
    assert_eq!(
        kv.get(get("default", "a/b/c"))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"slashes"
    );

    let missing = kv.get(get("default", "nope")).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    let del = DeleteRequest {
        namespace: "default".into(),
        key: "greeting".into(),
    };
    assert!(kv.delete(del.clone()).await.unwrap().into_inner().deleted);
    assert!(
        !kv.delete(del).await.unwrap().into_inner().deleted,
        "delete is idempotent"
    );
    assert_eq!(
        kv.get(get("default", "greeting")).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn list_paginates_every_key_exactly_once() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let mut kv = proxy.kv().await;
    let mut want: Vec<String> = (0..25).map(|i| format!("user/{i:03}")).collect();
    for k in &want {
        kv.put(put("default", k, k.as_bytes())).await.unwrap();
    }
    kv.put(put("default", "other/1", b"x")).await.unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = kv
            .list(ListRequest {
                namespace: "default".into(),
                prefix: "user/".into(),
                page_size: 10,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 10);
        for e in page.entries {
            assert_eq!(e.value, e.key.as_bytes());
            seen.push(e.key);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    want.sort();
    assert_eq!(seen, want, "every key once, in order, and only the prefix");
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn ttl_expires_keys() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let mut kv = proxy.kv().await;
    let mut short = put("default", "short", b"v");
    short.ttl = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    let mut long = put("default", "long", b"v");
    long.ttl = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    kv.put(short).await.unwrap();
    kv.put(long).await.unwrap();
    kv.put(put("default", "forever", b"v")).await.unwrap();

    eventually("the 200ms key expires", || {
        let mut kv = kv.clone();
        async move {
            match kv.get(get("default", "short")).await {
                Err(s) if s.code() == Code::NotFound => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        kv.get(get("default", "long")).await.is_ok(),
        "1h TTL still there"
    );
    assert!(
        kv.get(get("default", "forever")).await.is_ok(),
        "no TTL still there"
    );
}

#[tokio::test]
async fn unknown_namespace_is_not_found_and_names_the_known_ones() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default", "cache"])
        .start()
        .await;
    let err = proxy.kv().await.get(get("nope", "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("cache, default"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn namespaces_on_one_pattern_do_not_collide() {
    let proxy = Proxy::builder().memstore("mem", &["a", "b"]).start().await;
    let mut kv = proxy.kv().await;
    kv.put(put("a", "k", b"from a")).await.unwrap();
    kv.put(put("b", "k", b"from b")).await.unwrap();
    assert_eq!(
        kv.get(get("a", "k")).await.unwrap().into_inner().value,
        b"from a"
    );
    assert_eq!(
        kv.get(get("b", "k")).await.unwrap().into_inner().value,
        b"from b"
    );
}

#[tokio::test]
async fn health_reports_the_proxy_and_each_pattern() {
    let proxy = Proxy::builder()
        .memstore("one", &["a"])
        .memstore("two", &["b"])
        .start()
        .await;
    let mut health = proxy.health().await;
    for service in ["", "one", "two"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "three".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn a_sigkilled_pattern_is_noticed_recorded_and_restarted() {
    sigkilled_pattern_is_restarted(None).await;
}

/// `worker_threads: 1` puts the whole proxy — supervisor, health polling,
/// both front doors — on one thread; it must still notice a crash, restart,
/// serve, and stop cleanly.
#[tokio::test]
async fn a_single_threaded_proxy_restarts_serves_and_stops_cleanly() {
    let mut proxy = sigkilled_pattern_is_restarted(Some(1)).await;
    let log = proxy.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("\"listening\"") && l.contains("\"worker_threads\":1")),
        "{log}"
    );
    let pid = proxy.pattern("mem").await.pid;
    assert_eq!(proxy.terminate().await, Some(0), "{}", proxy.log_text());
    assert!(process_gone(pid), "pattern pid {pid} outlived the proxy");
}

async fn sigkilled_pattern_is_restarted(worker_threads: Option<usize>) -> Proxy {
    let mut builder = Proxy::builder()
        .memstore("mem", &["default"])
        .with("restart:\n  initial_backoff: 10ms");
    if let Some(n) = worker_threads {
        builder = builder.top(&format!("worker_threads: {n}"));
    }
    let proxy = builder.start().await;
    let before = proxy.pattern("mem").await;
    assert_eq!(before.state(), PatternState::Serving);
    assert!(before.pid > 0);
    kill(Pid::from_raw(before.pid as i32), Signal::SIGKILL).unwrap();

    let after = proxy
        .wait_pattern("mem", "the SIGKILL is recorded", |p| p.last_exit.is_some())
        .await;
    let exit = after.last_exit.unwrap();
    assert_eq!(
        exit.status,
        Some(exit_status::Status::Signal(9)),
        "{exit:?}"
    );
    assert!(exit.description.contains("SIGKILL"), "{}", exit.description);

    let back = proxy
        .wait_pattern("mem", "serving again with a new pid", |p| {
            p.state() == PatternState::Serving && p.pid != before.pid && p.pid != 0
        })
        .await;
    assert_eq!(back.restarts, 1);
    // And the data path works again.
    proxy.wait_serving("").await;
    proxy
        .kv()
        .await
        .put(put("default", "k", b"v"))
        .await
        .unwrap();
    proxy
}

#[tokio::test]
async fn sigterm_stops_every_pattern_and_exits_zero() {
    let mut proxy = Proxy::builder()
        .memstore("one", &["a"])
        .memstore("two", &["b"])
        .start()
        .await;
    let patterns = proxy
        .admin()
        .await
        .list_patterns(ListPatternsRequest {})
        .await
        .unwrap()
        .into_inner()
        .patterns;
    let pids: Vec<u32> = patterns.iter().map(|p| p.pid).collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| p > 0 && !process_gone(p)));

    assert_eq!(
        proxy.terminate().await,
        Some(0),
        "log:\n{}",
        proxy.log_text()
    );
    for pid in pids {
        assert!(process_gone(pid), "pattern pid {pid} outlived the proxy");
    }
    let log = proxy.log_text();
    assert!(log.contains("stopped"), "{log}");
}

#[tokio::test]
async fn sigkill_of_the_proxy_takes_its_patterns_down() {
    let mut proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let pid = proxy.pattern("mem").await.pid;
    assert!(!process_gone(pid));
    proxy.child.start_kill().unwrap();
    proxy.child.wait().await.unwrap();
    eventually("the orphaned pattern dies", || async {
        process_gone(pid).then_some(())
    })
    .await;
}

#[tokio::test]
async fn pattern_stderr_reaches_the_proxy_log_tagged_with_its_name() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    // The SDK logs at start-up; the proxy re-emits it inside the pattern's span.
    eventually("a re-emitted stderr line", || async {
        proxy
            .log_text()
            .lines()
            .any(|l| l.contains("\"stream\":\"stderr\"") && l.contains("\"pattern\":\"mem\""))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn cli_talks_to_a_running_proxy() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin("trellis"))
            .args(args)
            .env("TRELLIS_ADDR", &proxy.addr)
            .env("TRELLIS_ADMIN_ADDR", proxy.admin.as_deref().unwrap())
            .output()
            .expect("run trellis cli");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    assert_eq!(
        run(&["kv", "put", "default", "greeting", "hello"]).0,
        Some(0)
    );
    let (code, out, err) = run(&["kv", "get", "default", "greeting"]);
    assert_eq!((code, out.as_str()), (Some(0), "hello\n"), "{err}");
    let (code, _, err) = run(&["kv", "get", "default", "missing"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    let (code, table, _) = run(&["patterns"]);
    assert_eq!(code, Some(0));
    let row = table.lines().find(|l| l.starts_with("mem ")).expect(&table);
    assert!(row.contains("SERVING") && row.contains("unix:///"), "{row}");

    let (code, health, _) = run(&["health"]);
    assert_eq!(code, Some(0), "{health}");
    assert!(
        health.lines().filter(|l| l.ends_with("SERVING")).count() == 2,
        "{health}"
    );
}

#[tokio::test]
async fn invalid_config_exits_non_zero_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "listen:\n  grpc: 127.0.0.1:0\npatterns:\n  - name: Bad!\n    command: x\n",
    )
    .unwrap();
    for args in [
        vec!["check-config", file.to_str().unwrap()],
        vec!["--config", file.to_str().unwrap()],
    ] {
        let out = std::process::Command::new(bin("trellis"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(file.to_str().unwrap()),
            "names the file: {err}"
        );
        assert!(err.contains("patterns[0].name"), "names the field: {err}");
        assert!(
            err.contains("lowercase letters"),
            "says what is allowed: {err}"
        );
    }
    let ok = std::process::Command::new(bin("trellis"))
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "the embedded default is valid: {ok:?}"
    );
}

#[tokio::test]
async fn a_second_proxy_on_the_same_port_says_what_to_do() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let out = std::process::Command::new(bin("trellis"))
        .env("TRELLIS_LISTEN__GRPC", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&port.to_string()) && err.contains("TRELLIS_LISTEN__GRPC"),
        "{err}"
    );
}

#[tokio::test]
async fn a_cooperative_pattern_stops_on_lifecycle_stop_not_at_the_end_of_its_grace() {
    // With an hour of grace, only a prompt Lifecycle Stop lets the proxy
    // exit within the test's patience; the pattern exits 0 on its own.
    let mut proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .with("stop_grace: 1h")
        .start()
        .await;
    assert_eq!(
        proxy.terminate().await,
        Some(0),
        "log:\n{}",
        proxy.log_text()
    );
    let log = proxy.log_text();
    let stopped = log
        .lines()
        .find(|l| {
            l.contains("\"message\":\"stopped\"")
                && l.contains("\"pattern\":\"mem\"")
                && l.contains("exit")
        })
        .unwrap_or_else(|| panic!("no stopped line:\n{log}"));
    assert!(stopped.contains("exit code 0"), "{stopped}");
}
