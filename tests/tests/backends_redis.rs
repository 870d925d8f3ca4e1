//! trellis-redis against a real, private Redis that dies: SIGKILL, restart
//! on the same port. Measured times are printed (run with --nocapture), not
//! asserted: they depend on the machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1::PatternState;
use trellis_proto::data::v1::*;
use trellis_tests::backends::{RedisServer, redis_pattern};
use trellis_tests::kv::{get, put, spawn_writer};
use trellis_tests::{Proxy, eventually};

/// Small so a dead backend shows quickly; a request never waits longer.
const REQUEST_TIMEOUT: &str = "request_timeout: 3s";
const REDIS_CONFIG: &str = "connect_timeout: 300ms\nresponse_timeout: 500ms";
const FAST_HEALTH: &str = "health:\n  interval: 250ms";

#[tokio::test]
async fn redis_killed_and_restarted_serves_again_without_losing_acknowledged_writes() {
    let mut redis = RedisServer::start().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(redis_pattern(
            "cache",
            &["cache"],
            &redis.url(),
            REDIS_CONFIG,
        ))
        .with(FAST_HEALTH)
        .start()
        .await;
    let before = proxy.pattern("cache").await;
    let mut kv = proxy.kv().await;
    kv.put(put("cache", "seed", b"planted before the kill"))
        .await
        .expect("put before the kill");

    // A writer keeps going across the kill, so writes acknowledged just
    // before it are among those checked afterwards.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&proxy, "cache", Arc::clone(&stop));
    let mut probe = proxy.kv().await;
    eventually("the writer's 200th write", || {
        let mut probe = probe.clone();
        async move { probe.get(get("cache", "w/00000200")).await.ok().map(|_| ()) }
    })
    .await;

    redis.kill().await;
    let killed = Instant::now();

    // Health leaves SERVING, for the pattern's service and for "".
    eventually("the proxy to report the pattern NOT_SERVING", || async {
        (proxy.health_of("cache").await != Some(ServingStatus::Serving)).then_some(())
    })
    .await;
    let detected = killed.elapsed();
    let p = proxy
        .wait_pattern("cache", "pattern NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    assert_ne!(proxy.health_of("").await, Some(ServingStatus::Serving));

    // Meanwhile every kind of request answers UNAVAILABLE — not a hang
    // until the deadline (that would be DEADLINE_EXCEEDED).
    let started = Instant::now();
    let answers = [
        probe.get(get("cache", "seed")).await.map(|_| ()),
        probe.put(put("cache", "during", b"x")).await.map(|_| ()),
        probe
            .delete(DeleteRequest {
                namespace: "cache".into(),
                key: "seed".into(),
            })
            .await
            .map(|_| ()),
        probe
            .list(ListRequest {
                namespace: "cache".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    ];
    let outage_answers = started.elapsed();
    for a in &answers {
        let err = a
            .as_ref()
            .expect_err("no request succeeds while Redis is down");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            !err.message().contains("127.0.0.1"),
            "no address leaks: {err:?}"
        );
    }

    redis.restart().await;
    let restarted = Instant::now();
    proxy.wait_serving("cache").await;
    let serving_again = restarted.elapsed();
    eventually("a Get to succeed again", || {
        let mut probe = probe.clone();
        async move { probe.get(get("cache", "seed")).await.ok().map(|_| ()) }
    })
    .await;
    let first_success = restarted.elapsed();

    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await.expect("writer");

    // Zero acknowledged writes lost (appendonly + appendfsync always).
    let mut lost = Vec::new();
    for (key, value) in &acked {
        match kv.get(get("cache", key)).await {
            Ok(r) if r.get_ref().value == *value => {}
            other => lost.push((key.clone(), other.map(|r| r.into_inner().value))),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes were lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(
        kv.get(get("cache", "seed"))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"planted before the kill"
    );

    // The pattern rode it out: same process, never restarted.
    let after = proxy.pattern("cache").await;
    assert_eq!(after.pid, before.pid, "the pattern process was replaced");
    assert_eq!(after.restarts, before.restarts);
    assert!(p.last_error.contains("NOT_SERVING"), "{}", p.last_error);

    println!(
        "redis outage: NOT_SERVING seen {detected:?} after SIGKILL; 4 requests answered \
         UNAVAILABLE in {outage_answers:?}; SERVING {serving_again:?} and first Get OK \
         {first_success:?} after the restart; {} writes acknowledged, {failed} refused, 0 lost",
        acked.len()
    );
}

#[tokio::test]
async fn memstore_keeps_serving_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(redis_pattern(
            "cache",
            &["cache"],
            &redis.url(),
            REDIS_CONFIG,
        ))
        .with(FAST_HEALTH)
        .memstore("mem", &["local"])
        .start()
        .await;
    redis.kill().await;
    proxy
        .wait_pattern("cache", "redis pattern NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;

    let mut kv = proxy.kv().await;
    for i in 0..200 {
        let key = format!("k{i}");
        kv.put(put("local", &key, key.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("memstore put {i} failed while redis is down: {e:?}"));
        let got = kv
            .get(get("local", &key))
            .await
            .unwrap_or_else(|e| panic!("memstore get {i} failed while redis is down: {e:?}"));
        assert_eq!(got.into_inner().value, key.as_bytes());
    }
    assert_eq!(proxy.health_of("mem").await, Some(ServingStatus::Serving));
    assert_eq!(
        kv.get(get("cache", "any")).await.unwrap_err().code(),
        Code::Unavailable
    );
    // Still down: the outage covered the whole loop.
    assert_ne!(proxy.health_of("cache").await, Some(ServingStatus::Serving));
}

#[tokio::test]
async fn redis_down_at_boot_starts_not_serving_then_serves_once_redis_is_up() {
    let mut redis = RedisServer::start().await;
    redis.kill().await;
    let proxy = Proxy::builder()
        .top(REQUEST_TIMEOUT)
        .pattern(redis_pattern(
            "cache",
            &["cache"],
            &redis.url(),
            REDIS_CONFIG,
        ))
        .with("startup_timeout: 1s\nhealth:\n  interval: 250ms")
        .spawn()
        .await;
    // Kept as NOT_SERVING (alive, answering), not killed and restarted.
    let p = proxy
        .wait_pattern("cache", "NOT_SERVING after start-up", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    let mut kv = proxy.kv().await;
    let err = kv.get(get("cache", "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    redis.restart().await;
    proxy.wait_serving("cache").await;
    kv.put(put("cache", "k", b"v"))
        .await
        .expect("put once Redis is up");
    assert_eq!(
        kv.get(get("cache", "k")).await.unwrap().into_inner().value,
        b"v"
    );
    let after = proxy.pattern("cache").await;
    assert_eq!(after.pid, p.pid, "the pattern process was replaced");
    assert_eq!(after.restarts, 0);
}
