//! The shutdown lifecycle as a load balancer and a health watcher see it:
//! on SIGTERM, readiness (`""`) turns NOT_SERVING at once while calls are
//! still served for `drain_delay`; then every `Watch` stream ends, the
//! doors close, the patterns stop, and the proxy exits 0. And `Watch`
//! sends a status only when it changes.

use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_tests::kv::{get, put};
use trellis_tests::{PATIENCE, Proxy, eventually, process_gone};

fn sigterm(proxy: &Proxy) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

#[tokio::test]
async fn sigterm_turns_readiness_off_at_once_serves_through_the_drain_delay_and_ends_watches() {
    const DRAIN: Duration = Duration::from_secs(2);
    let mut proxy = Proxy::builder()
        .top("drain_delay: 2s")
        .memstore("mem", &["m"])
        .start()
        .await;
    let pattern_pid = proxy.pattern("mem").await.pid;
    let mut kv = proxy.kv().await;
    kv.put(put("m", "k", b"v")).await.unwrap();
    let mut watch = proxy
        .health()
        .await
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    sigterm(&proxy);
    let signalled = Instant::now();
    let next = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("a status after the signal")
        .expect("the watch stream")
        .expect("a message, not the end");
    let seen_after = signalled.elapsed();
    assert_eq!(next.status(), ServingStatus::NotServing);
    println!("NOT_SERVING seen {seen_after:?} after SIGTERM");
    assert!(
        seen_after < DRAIN,
        "readiness turned off only after {seen_after:?}"
    );

    // Calls keep succeeding while readiness is off, until the drain delay.
    let mut served = 0;
    while signalled.elapsed() < DRAIN - Duration::from_millis(500) {
        let v = kv
            .get(get("m", "k"))
            .await
            .expect("served during the drain delay");
        assert_eq!(v.into_inner().value, b"v");
        served += 1;
    }
    assert!(served > 0);

    // Then the watch stream ends (it does not hold the exit), and the
    // proxy exits 0 without waiting out `shutdown_grace` (15 s).
    let end = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("the watch stream ends");
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "no further status after NOT_SERVING: {end:?}"
    );
    assert_eq!(proxy.terminate().await, Some(0), "{}", proxy.log_text());
    let took = signalled.elapsed();
    assert!(
        took >= DRAIN && took < DRAIN + Duration::from_secs(10),
        "exited {took:?} after the signal"
    );
    assert!(process_gone(pattern_pid), "the pattern outlived the proxy");
}

#[tokio::test]
async fn a_watcher_sees_each_status_once_across_a_pattern_crash_and_restart() {
    let proxy = Proxy::builder().memstore("mem", &["m"]).start().await;
    let pid = proxy.pattern("mem").await.pid;
    let mut watch = proxy
        .health()
        .await
        .watch(HealthCheckRequest {
            service: "mem".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = vec![watch.message().await.unwrap().unwrap().status()];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while seen.len() < 3 {
        let m = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .expect("a status change")
            .unwrap()
            .unwrap();
        seen.push(m.status());
    }
    assert_eq!(
        seen,
        [
            ServingStatus::Serving,
            ServingStatus::NotServing,
            ServingStatus::Serving
        ]
    );
    eventually("the restarted pattern to be listed", || async {
        (proxy.pattern("mem").await.pid != pid).then_some(())
    })
    .await;
    // Nothing more: a repeat of SERVING would arrive with the next health
    // poll (every second); wait past two of them.
    let more = tokio::time::timeout(Duration::from_millis(2500), watch.message()).await;
    assert!(
        more.is_err(),
        "an unchanged status was sent again: {more:?}"
    );
}

/// Liveness is not readiness: with its only pattern down for good, the
/// proxy is not ready (`""`, `GET /readyz` 503) but alive
/// (`trellis.liveness`, `GET /livez` 200), so a liveness probe does not
/// restart it for a backend's sake.
#[tokio::test]
async fn liveness_stays_on_while_readiness_follows_the_patterns() {
    let proxy = Proxy::builder()
        .memstore("mem", &["m"])
        .with("restart:\n  policy: never")
        .start()
        .await;
    let base = proxy.http.clone().expect("an HTTP listener");
    let ready = trellis_tests::http::get(&format!("{base}/readyz")).await;
    assert_eq!(ready.status, http::StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.text(), "ok\n");
    let pid = proxy.pattern("mem").await.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("readiness to turn off", || async {
        (proxy.health_of("").await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;
    assert_eq!(
        proxy.health_of("trellis.liveness").await,
        Some(ServingStatus::Serving)
    );
    let ready = trellis_tests::http::get(&format!("{base}/readyz")).await;
    assert_eq!(ready.status, http::StatusCode::SERVICE_UNAVAILABLE);
    let live = trellis_tests::http::get(&format!("{base}/livez")).await;
    assert_eq!(live.status, http::StatusCode::OK, "{}", live.text());
}

/// Starts `n` `Get sleep:<ms>` calls on the echo pattern's namespace `e`
/// and returns once all `n` are sleeping in the pattern.
async fn calls_in_flight(
    proxy: &Proxy,
    n: usize,
    ms: u64,
) -> Vec<tokio::task::JoinHandle<Result<Vec<u8>, tonic::Status>>> {
    let channel = proxy.channel().await;
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let mut kv =
                trellis_proto::data::v1::key_value_client::KeyValueClient::new(channel.clone());
            async move {
                let mut req = tonic::Request::new(get("e", &format!("sleep:{ms}")));
                req.set_timeout(PATIENCE);
                kv.get(req).await.map(|r| r.into_inner().value)
            }
        })
        .map(tokio::spawn)
        .collect();
    let kv = proxy.kv().await;
    eventually("every call is in flight in the pattern", || {
        let mut kv = kv.clone();
        async move {
            let v = kv.get(get("e", "sleeping")).await.ok()?.into_inner().value;
            (v == n.to_string().into_bytes()).then_some(())
        }
    })
    .await;
    calls
}

#[tokio::test]
async fn calls_in_flight_to_a_slow_pattern_all_succeed_through_the_shutdown() {
    let mut proxy = Proxy::builder()
        .top("shutdown_grace: 30s")
        .echo("echo", &["e"], "")
        .start()
        .await;
    let pattern_pid = proxy.pattern("echo").await.pid;
    let calls = calls_in_flight(&proxy, 5, 1500).await;
    sigterm(&proxy);
    for call in calls {
        let value = call.await.unwrap().expect("an in-flight call succeeds");
        assert_eq!(value, b"slept");
    }
    assert_eq!(proxy.terminate().await, Some(0), "{}", proxy.log_text());
    assert!(process_gone(pattern_pid), "the pattern outlived the proxy");
}

/// A second SIGTERM skips what is left of the drain delay and of
/// `shutdown_grace` (an hour each here): the proxy exits long before.
#[tokio::test]
async fn a_second_signal_skips_the_remaining_waits() {
    let mut proxy = Proxy::builder()
        .top("drain_delay: 1h\nshutdown_grace: 1h")
        .echo("echo", &["e"], "")
        .start()
        .await;
    let pattern_pid = proxy.pattern("echo").await.pid;
    let calls = calls_in_flight(&proxy, 2, 3_600_000).await;
    sigterm(&proxy);
    eventually("readiness to turn off", || async {
        (proxy.health_of("").await == Some(ServingStatus::NotServing)).then_some(())
    })
    .await;
    sigterm(&proxy);
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait())
        .await
        .expect("the proxy exits without waiting out its hour-long waits")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{}", proxy.log_text());
    assert!(
        proxy.log_text().contains("a second signal"),
        "{}",
        proxy.log_text()
    );
    for call in calls {
        let outcome = call.await.unwrap();
        assert!(outcome.is_err(), "an hour-long call cannot have succeeded");
    }
    assert!(process_gone(pattern_pid), "the pattern outlived the proxy");
}
