//! Liveness is the proxy's own: `trellis.liveness` stays SERVING, said
//! once, and systemd's WATCHDOG=1 keeps coming while a pattern crash-loops
//! into FAILED; the `Watch` on it ends with the drain. (That a stuck owner
//! task turns it off is unit-tested in `proxy/src/liveness.rs` with a
//! paused clock; a stopped pattern's case is in drain.rs.)

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1::PatternState;
use trellis_tests::sd_notify::NotifySocket;
use trellis_tests::{PATIENCE, Proxy, eventually};

#[tokio::test]
async fn liveness_and_the_watchdog_hold_while_a_pattern_crash_loops_into_failed() {
    let sock = NotifySocket::bind();
    let mut proxy = Proxy::builder()
        .memstore("mem", &["m"])
        .chaos("loop", &["x"], "exit_after: 50ms\nexit_code: 1")
        .with("restart:\n  initial_backoff: 50ms\n  max_backoff: 100ms\n  max_starts: 4\n  start_window: 1h\n  cool_down: null")
        .env("NOTIFY_SOCKET", &sock.path())
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .await;

    // Watch liveness from the start (the service appears with the
    // watchdog's first tick).
    let health = proxy.health().await;
    let mut watch = eventually("a Watch on trellis.liveness", || {
        let mut health = health.clone();
        async move {
            health
                .watch(HealthCheckRequest {
                    service: "trellis.liveness".into(),
                })
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    })
    .await;
    let first = watch.message().await.unwrap().expect("a first status");
    assert_eq!(first.status(), ServingStatus::Serving);

    // The pattern exits, restarts, and the breaker fails it.
    let p = proxy
        .wait_pattern("loop", "FAILED by the crash-loop breaker", |p| {
            p.state() == PatternState::Failed
        })
        .await;
    assert!(p.restarts >= 3, "it crash-looped: {p:?}");
    // Not ready, but alive.
    assert_eq!(proxy.health_of("").await, Some(ServingStatus::NotServing));
    assert_eq!(
        proxy.health_of("trellis.liveness").await,
        Some(ServingStatus::Serving)
    );
    // The watchdog pings go on: two more after everything sent so far.
    sock.drain();
    let mut pings = 0;
    while pings < 2 {
        if sock.next().await.has("WATCHDOG=1") {
            pings += 1;
        }
    }

    // On SIGTERM the Watch ends with the drain, having said SERVING once.
    let pid = nix::unistd::Pid::from_raw(proxy.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("the Watch ends with the drain")
    {
        rest.push(m.status());
    }
    assert!(
        rest.is_empty(),
        "liveness changed (or repeated) during a crash loop: {rest:?}"
    );
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait())
        .await
        .expect("the proxy exits")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
