//! Hot reload and blue/green replacement, under a steady load of calls:
//! a reload that changes one pattern fails no call and keeps the other
//! patterns' processes; an operator restart of a Redis-backed pattern
//! under a writer fails no call and loses no acknowledged write; an
//! invalid reload changes nothing and says every problem; a reload adds
//! and removes patterns and moves namespaces (SIGHUP); the CLI's `reload`
//! exits 2 on a refusal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1 as admin;
use trellis_tests::backends::{RedisServer, free_port, redis_pattern};
use trellis_tests::kv::{get, put, spawn_writer};
use trellis_tests::{PatternEntry, Proxy, ProxyBuilder, bin, eventually, process_gone};

/// Two memstore patterns, `a` (namespace `a`) and `b` (namespace `b`);
/// `b_env` goes into `b`'s environment, so changing it changes `b`.
fn two_memstores(b_env: &str) -> ProxyBuilder {
    Proxy::builder()
        .memstore("a", &["a"])
        .memstore("b", &["b"])
        .with(&format!("env:\n  GENERATION: \"{b_env}\""))
}

async fn pid_of(proxy: &Proxy, name: &str) -> u32 {
    proxy.pattern(name).await.pid
}

/// Writes `new`'s configuration over the running proxy's file.
fn rewrite(proxy: &Proxy, new: &ProxyBuilder) {
    std::fs::write(&proxy.config_path, new.yaml()).expect("rewrite the config");
}

#[tokio::test]
async fn a_reload_that_changes_one_pattern_replaces_it_blue_green_and_fails_no_call() {
    let proxy = two_memstores("1").start().await;
    let (a_pid, b_pid) = (pid_of(&proxy, "a").await, pid_of(&proxy, "b").await);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        spawn_writer(&proxy, "a", stop.clone()),
        spawn_writer(&proxy, "b", stop.clone()),
    ];

    // Let both writers get going before the change.
    let mut kv = proxy.kv().await;
    eventually("both writers have written", || {
        let mut kv = kv.clone();
        async move {
            let a = kv.get(get("a", "w/00000010")).await.is_ok();
            let b = kv.get(get("b", "w/00000010")).await.is_ok();
            (a && b).then_some(())
        }
    })
    .await;
    rewrite(&proxy, &two_memstores("2"));
    let applied = proxy.reload().await.expect("the reload is applied");
    assert_eq!(applied.replaced, ["b"], "{applied:?}");
    assert_eq!(applied.unchanged, ["a"], "{applied:?}");
    assert!(applied.added.is_empty() && applied.removed.is_empty());

    // Calls keep flowing to the new process, then stop.
    let new_b = pid_of(&proxy, "b").await;
    assert_ne!(new_b, b_pid, "b was replaced by a new process");
    kv.put(put("b", "after", b"x")).await.expect("b serves");
    // Keep the writers going well past the switch.
    eventually("both writers to write on", || {
        let mut kv = kv.clone();
        async move {
            let a = kv.get(get("a", "w/00000300")).await.is_ok();
            let b = kv.get(get("b", "w/00000300")).await.is_ok();
            (a && b).then_some(())
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for (ns, w) in ["a", "b"].into_iter().zip(writers) {
        let (acked, failed) = w.await.unwrap();
        println!(
            "namespace {ns}: {} writes acknowledged across the reload, {failed} failed",
            acked.len()
        );
        assert_eq!(
            failed,
            0,
            "calls failed across the reload ({} acknowledged); proxy log:\n{}",
            acked.len(),
            proxy.log_text()
        );
    }
    assert_eq!(pid_of(&proxy, "a").await, a_pid, "a kept its process");
    eventually("the old b process is gone", || async {
        process_gone(b_pid).then_some(())
    })
    .await;
    let b = proxy.pattern("b").await;
    assert_eq!(b.restarts, 1, "the replacement counts as a restart: {b:?}");
}

#[tokio::test]
async fn an_operator_restart_of_the_redis_pattern_under_a_writer_fails_no_call_and_loses_no_write()
{
    let redis = RedisServer::start().await;
    let proxy = Proxy::builder()
        .pattern(redis_pattern("redis", &["r"], &redis.url(), ""))
        .memstore("mem", &["m"])
        .start()
        .await;
    let (redis_pid, mem_pid) = (pid_of(&proxy, "redis").await, pid_of(&proxy, "mem").await);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&proxy, "r", stop.clone());
    let mut kv = proxy.kv().await;
    eventually("the writer has written", || {
        let mut kv = kv.clone();
        async move { kv.get(get("r", "w/00000010")).await.ok().map(|_| ()) }
    })
    .await;

    let restarted = proxy
        .admin()
        .await
        .restart_pattern(admin::PatternActionRequest {
            name: "redis".into(),
        })
        .await
        .expect("the restart succeeds")
        .into_inner();
    assert!(
        restarted.message.contains("blue/green"),
        "{}",
        restarted.message
    );
    let reported = restarted.pattern.expect("the pattern after the restart");
    assert_ne!(
        reported.pid, redis_pid,
        "a new process serves: {reported:?}"
    );
    assert_eq!(reported.state(), admin::PatternState::Serving);

    // Keep writing through the new process for a while.
    let after = reported.pid;
    eventually("the writer writes on through the new process", || {
        let mut kv = kv.clone();
        async move { kv.get(get("r", "w/00000300")).await.ok().map(|_| ()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await.unwrap();
    println!(
        "{} writes acknowledged across the blue/green restart, {failed} failed",
        acked.len()
    );
    assert_eq!(
        failed,
        0,
        "writes failed across the restart; proxy log:\n{}",
        proxy.log_text()
    );
    assert!(acked.len() > 10, "the writer wrote: {}", acked.len());
    for (key, value) in &acked {
        let got = kv
            .get(get("r", key))
            .await
            .unwrap_or_else(|e| panic!("acknowledged {key} is lost: {e}"));
        assert_eq!(&got.into_inner().value, value, "{key}");
    }
    assert_eq!(pid_of(&proxy, "mem").await, mem_pid, "mem kept its process");
    assert_eq!(pid_of(&proxy, "redis").await, after);
    eventually("the old redis pattern process is gone", || async {
        process_gone(redis_pid).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_invalid_reload_changes_nothing_and_names_every_problem() {
    let proxy = two_memstores("1").start().await;
    let (a_pid, b_pid) = (pid_of(&proxy, "a").await, pid_of(&proxy, "b").await);
    let mut kv = proxy.kv().await;
    kv.put(put("a", "k", b"v")).await.unwrap();

    // Not YAML the config accepts: an unknown field.
    let good = two_memstores("1").yaml();
    std::fs::write(&proxy.config_path, format!("{good}no_such_setting: true\n")).unwrap();
    let refused = proxy
        .reload()
        .await
        .expect_err("an unknown field is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("no_such_setting"),
        "{}",
        refused.message()
    );

    // Valid YAML, but a change that cannot happen live, a pattern whose
    // command is missing, and a change to b: all refused at once, b kept.
    let bad = two_memstores("2")
        .top("worker_threads: 3")
        .pattern(PatternEntry::new(
            "ghost",
            "/nonexistent/trellis-ghost",
            &[],
        ))
        .yaml();
    std::fs::write(&proxy.config_path, bad).unwrap();
    let out = tokio::process::Command::new(bin("trellis"))
        .args(["reload", "--admin-addr", proxy.admin.as_deref().unwrap()])
        .output()
        .await
        .expect("run trellis reload");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for field in ["worker_threads", "patterns[2].command"] {
        assert!(stderr.contains(field), "{field} is not named in: {stderr}");
    }
    assert!(stderr.contains("keeps running"), "{stderr}");

    // Nothing changed.
    assert_eq!(pid_of(&proxy, "a").await, a_pid);
    assert_eq!(pid_of(&proxy, "b").await, b_pid);
    let names: Vec<String> = proxy
        .admin()
        .await
        .list_patterns(admin::ListPatternsRequest {})
        .await
        .unwrap()
        .into_inner()
        .patterns
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        kv.get(get("a", "k")).await.unwrap().into_inner().value,
        b"v"
    );
}

#[tokio::test]
async fn sighup_adds_and_removes_patterns_and_moves_namespaces() {
    // a: x; b: y  →  a: x, z; c: y (b removed)
    let proxy = Proxy::builder()
        .memstore("a", &["x"])
        .memstore("b", &["y"])
        .start()
        .await;
    let (a_pid, b_pid) = (pid_of(&proxy, "a").await, pid_of(&proxy, "b").await);
    let mut kv = proxy.kv().await;
    kv.put(put("x", "k", b"kept")).await.unwrap();
    let unknown = kv
        .get(get("z", "k"))
        .await
        .expect_err("z is not routed yet");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Liveness is about the proxy's own loops: a reload that removes a
    // pattern (its owner task ends) must not turn it off.
    let mut liveness = proxy
        .health()
        .await
        .watch(HealthCheckRequest {
            service: "trellis.liveness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = liveness.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let next = Proxy::builder()
        .memstore("a", &["x", "z"])
        .memstore("c", &["y"]);
    rewrite(&proxy, &next);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    eventually("the reload is logged", || async {
        proxy
            .log_text()
            .contains("configuration reloaded")
            .then_some(())
    })
    .await;
    proxy.wait_serving("c").await;
    proxy.wait_serving("").await;

    // a kept its process and its data, and serves z too.
    assert_eq!(pid_of(&proxy, "a").await, a_pid);
    assert_eq!(
        kv.get(get("x", "k")).await.unwrap().into_inner().value,
        b"kept"
    );
    kv.put(put("z", "k", b"z")).await.expect("z is routed to a");
    // y moved to c.
    kv.put(put("y", "k", b"y")).await.expect("y is routed to c");
    assert_eq!(
        kv.get(get("y", "k")).await.unwrap().into_inner().value,
        b"y"
    );
    // b is gone: its process, its health service, its admin entry.
    eventually("b's process is gone", || async {
        process_gone(b_pid).then_some(())
    })
    .await;
    let b_health = proxy
        .health()
        .await
        .check(HealthCheckRequest {
            service: "b".into(),
        })
        .await;
    assert_eq!(
        b_health.expect_err("b has no health service").code(),
        tonic::Code::NotFound
    );
    let c_health = proxy
        .health()
        .await
        .check(HealthCheckRequest {
            service: "c".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c_health.status(), ServingStatus::Serving);
    let gone = proxy
        .admin()
        .await
        .get_pattern(admin::GetPatternRequest { name: "b".into() })
        .await
        .expect_err("b is not a pattern any more");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    // The watchdog ticks every second: past two ticks, nothing changed.
    let change = tokio::time::timeout(Duration::from_millis(2500), liveness.message()).await;
    assert!(
        change.is_err(),
        "liveness changed across the reload: {change:?}"
    );
}

/// A reload that changes the listen addresses serves the new ones, then
/// closes the old ones (the reload's own call, on the old door, is
/// answered first); an address in use refuses the reload, naming it.
#[tokio::test]
async fn a_reload_rebinds_changed_listeners_and_refuses_an_address_in_use() {
    let proxy = two_memstores("1").start().await;
    let a_pid = pid_of(&proxy, "a").await;
    let old_http = proxy.http.clone().expect("an HTTP door");

    // An address someone else holds: refused, nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let yaml = two_memstores("1")
        .yaml()
        .replace("http: 127.0.0.1:0", &format!("http: {taken_addr}"));
    std::fs::write(&proxy.config_path, yaml).unwrap();
    let refused = proxy.reload().await.expect_err("the address is taken");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("listen.http") && refused.message().contains("cannot listen"),
        "{}",
        refused.message()
    );
    let live = trellis_tests::http::get(&format!("{old_http}/livez")).await;
    assert_eq!(
        live.status,
        http::StatusCode::OK,
        "the old door still serves"
    );
    drop(taken);

    // Free addresses: both doors move; the patterns keep their processes.
    let (grpc_port, http_port, admin_port) = (free_port(), free_port(), free_port());
    let yaml = two_memstores("1")
        .yaml()
        .replace("grpc: 127.0.0.1:0", &format!("grpc: 127.0.0.1:{grpc_port}"))
        .replace("http: 127.0.0.1:0", &format!("http: 127.0.0.1:{http_port}"))
        .replace(
            "admin: 127.0.0.1:0",
            &format!("admin: 127.0.0.1:{admin_port}"),
        );
    std::fs::write(&proxy.config_path, yaml).unwrap();
    let applied = proxy.reload().await.expect("the reload is applied");
    for field in ["listen.grpc", "listen.http", "listen.admin"] {
        assert!(
            applied.message.contains(field),
            "{field}: {}",
            applied.message
        );
    }
    assert_eq!(applied.unchanged, ["a", "b"], "{applied:?}");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc_port}"))
        .unwrap()
        .connect()
        .await
        .expect("the new gRPC door serves");
    let mut kv = trellis_proto::data::v1::key_value_client::KeyValueClient::new(channel.clone());
    kv.put(put("a", "k", b"v"))
        .await
        .expect("a call on the new door");
    let live = trellis_tests::http::get(&format!("http://127.0.0.1:{http_port}/livez")).await;
    assert_eq!(live.status, http::StatusCode::OK);
    let old_grpc = proxy.addr.trim_start_matches("http://").to_string();
    let old_http = old_http.trim_start_matches("http://").to_string();
    eventually("the old doors to close", || {
        let closed = |a: &str| std::net::TcpStream::connect(a).is_err();
        let both = closed(&old_grpc) && closed(&old_http);
        async move { both.then_some(()) }
    })
    .await;
    let admin_door =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{admin_port}"))
            .unwrap()
            .connect()
            .await
            .expect("the new admin door serves");
    let mut admin = trellis_proto::admin::v1::admin_client::AdminClient::new(admin_door);
    let a = admin
        .get_pattern(admin::GetPatternRequest { name: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.pid, a_pid, "a kept its process");
}
