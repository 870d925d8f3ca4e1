//! The key-value conformance kit (pattern-sdk feature `conformance`) run
//! against every key-value pattern, through the real proxy (the whole path:
//! client → proxy → pattern → backend), and once against a bare pattern
//! process (the kit's own spawn helper, no proxy). Both go through
//! `conformance::run`, the code behind the `trellis-conformance` command.

use pattern_sdk::conformance::{self, Options, Suite, Target};
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};
use trellis_tests::{PATIENCE, Proxy, bin};

const NS: &str = "kv";
const OTHER: &str = "kv-other";

fn options() -> Options {
    Options {
        suites: vec![Suite::Kv],
        namespaces: Some((NS.into(), OTHER.into())),
        patience: PATIENCE,
        ..Options::default()
    }
}

async fn run_through(proxy: &Proxy) {
    let reports = conformance::run(Target::Connect(proxy.addr.clone()), &options())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for report in &reports {
        println!("{report}");
    }
    assert!(
        reports.len() == 1 && reports[0].all_passed(),
        "conformance checks failed:\n{}\nproxy log:\n{}",
        conformance::text(&reports),
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

/// The kv suite on a bare memstore, then its stop: the `lifecycle.stop`
/// check is that it exits 0 after `Lifecycle/Stop`.
#[tokio::test]
async fn memstore_conforms_as_a_bare_pattern() {
    let target = Target::Spawn(conformance::PatternCommand {
        program: bin("trellis-memstore"),
        args: Vec::new(),
        name: "mem".into(),
        config: serde_json::json!({ "sweep_interval": "100ms" }),
    });
    let reports = conformance::run(target, &options())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let suites: Vec<&str> = reports.iter().map(|r| r.suite).collect();
    assert_eq!(suites, ["kv", conformance::LIFECYCLE]);
    for report in &reports {
        println!("{report}");
        report.assert_all_passed();
    }
}
