//! trellis-redis against a real, private Redis that dies: SIGKILL, restart
//! on the same port. Measured times are printed (run with --nocapture), not
//! asserted: they depend on the machine.

use tonic::Code;
use trellis_proto::admin::v1::PatternState;
use trellis_tests::Proxy;
use trellis_tests::backends::{RedisServer, redis_pattern};
use trellis_tests::kv::{get, put};
use trellis_tests::outage::{die_and_return, others_keep_serving};

/// Small so a dead backend shows quickly; a request never waits longer.
const REQUEST_TIMEOUT: &str = "request_timeout: 3s";
const REDIS_CONFIG: &str = "connect_timeout: 300ms\nresponse_timeout: 500ms";
const FAST_HEALTH: &str = "health:\n  interval: 250ms";

/// SIGKILL under a steady writer, then a restart on the same port. No
/// acknowledged write is lost: the private Redis runs with `appendonly yes`
/// and `appendfsync always`, so an acknowledged SET is on disk.
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
    let outage = die_and_return(&proxy, "cache", "cache", &mut redis, &["127.0.0.1"]).await;
    println!("redis outage: {outage}");
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
    others_keep_serving(&proxy, "cache", "cache", &mut redis, "mem", "local").await;
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

/// Two proxies, each with its own trellis-redis, on one Redis share the
/// idempotency records: a keyed Put through A, repeated through B, is a
/// replay there and does not write again.
#[tokio::test]
async fn two_proxies_on_one_redis_share_idempotency_records() {
    use trellis_tests::kv::{idempotent_replayed as replayed, with_idempotency_key as keyed};

    let redis = RedisServer::start().await;
    let a = Proxy::builder()
        .pattern(redis_pattern("cache", &["cache"], &redis.url(), ""))
        .start()
        .await;
    let b = Proxy::builder()
        .pattern(redis_pattern("cache", &["cache"], &redis.url(), ""))
        .start()
        .await;
    let (mut kv_a, mut kv_b) = (a.kv().await, b.kv().await);

    let first = kv_a
        .put(keyed(put("cache", "k", b"first"), "shared-key"))
        .await
        .expect("the keyed Put through A");
    assert!(!replayed(&first), "the first keyed Put runs");
    // Someone writes the key in between, without an idempotency key.
    kv_a.put(put("cache", "k", b"between"))
        .await
        .expect("the Put without a key through A");
    let again = kv_b
        .put(keyed(put("cache", "k", b"first"), "shared-key"))
        .await
        .expect("the same keyed Put through B");
    assert!(replayed(&again), "B replays A's write");
    for (name, kv) in [("A", &mut kv_a), ("B", &mut kv_b)] {
        let value = kv.get(get("cache", "k")).await.unwrap().into_inner().value;
        assert_eq!(
            value, b"between",
            "the replay through B wrote again (read via {name})"
        );
    }
}
