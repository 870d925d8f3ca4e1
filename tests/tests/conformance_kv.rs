//! The key-value conformance kit (pattern-sdk feature `conformance`) run
//! against every key-value pattern, through the real proxy (the whole path:
//! client → proxy → pattern → backend), and once against a bare pattern
//! process (the kit's own spawn helper, no proxy).

use pattern_sdk::conformance::kv::{self, Kit, PatternProcess};
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};
use trellis_tests::{PATIENCE, Proxy, bin};

const NS: &str = "kv";
const OTHER: &str = "kv-other";

async fn run_through(proxy: &Proxy) {
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
async fn memstore_conforms_through_the_proxy() {
    let proxy = Proxy::builder().memstore("mem", &[NS, OTHER]).start().await;
    run_through(&proxy).await;
}

#[tokio::test]
async fn redis_conforms_through_the_proxy() {
    let redis = RedisServer::start().await;
    let proxy = Proxy::builder()
        .pattern(redis_pattern("cache", &[NS, OTHER], &redis.url(), ""))
        .start()
        .await;
    run_through(&proxy).await;
}

#[tokio::test]
async fn postgres_conforms_through_the_proxy() {
    let pg = PostgresServer::start().await;
    let proxy = Proxy::builder()
        .pattern(postgres_pattern(
            "db",
            &[NS, OTHER],
            &pg.url(),
            "purge_interval: 200ms",
        ))
        .start()
        .await;
    run_through(&proxy).await;
}

#[tokio::test]
async fn memstore_conforms_as_a_bare_pattern() {
    let pattern = PatternProcess::spawn(
        &bin("trellis-memstore"),
        "mem",
        serde_json::json!({ "sweep_interval": "100ms" }),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let kit = Kit::new(pattern.kv(), NS, OTHER).patience(PATIENCE);
    let report = kv::run_all(&kit).await;
    println!("{report}");
    report.assert_all_passed();
    assert!(
        pattern
            .stop(std::time::Duration::from_secs(5))
            .await
            .unwrap(),
        "memstore exits 0 after Stop"
    );
}
