//! The idempotency conformance suite (pattern-sdk `conformance::idempotency`)
//! through the real proxy on every key-value pattern that honours keys, with
//! the namespace policy's retention at the suite's 2 s; and the refusal of
//! keys by a pattern that cannot honour them.

use pattern_sdk::conformance::idempotency;
use pattern_sdk::conformance::kv::Kit;
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};
use trellis_tests::{PATIENCE, Proxy, ProxyBuilder};

const NS: &str = "kv";
const OTHER: &str = "kv-other";
const POLICY: &str = "policies:\n  default:\n    idempotency: { retention: 2s }";

async fn run_through(builder: ProxyBuilder) {
    let proxy = builder.top(POLICY).start().await;
    let kit = Kit::connect(proxy.addr.clone(), NS, OTHER)
        .await
        .expect("connect to the proxy")
        .patience(PATIENCE);
    let report = idempotency::run_all(&kit).await;
    println!("{report}");
    assert!(
        report.all_passed(),
        "idempotency checks failed:\n{report}\nproxy log:\n{}",
        proxy.log_text()
    );
}

#[tokio::test]
async fn memstore_honours_idempotency_keys() {
    run_through(Proxy::builder().memstore("mem", &[NS, OTHER])).await;
}

#[tokio::test]
async fn redis_honours_idempotency_keys() {
    let redis = RedisServer::start().await;
    run_through(Proxy::builder().pattern(redis_pattern("cache", &[NS, OTHER], &redis.url(), "")))
        .await;
}

#[tokio::test]
async fn postgres_honours_idempotency_keys() {
    let pg = PostgresServer::start().await;
    run_through(Proxy::builder().pattern(postgres_pattern(
        "db",
        &[NS, OTHER],
        &pg.url(),
        "purge_interval: 200ms",
    )))
    .await;
}

/// NATS core cannot record a key atomically with a publish (no transaction
/// spans the two), so the pattern refuses keys plainly instead of
/// pretending; a publish without a key is unaffected.
#[tokio::test]
async fn nats_refuses_idempotency_keys_naming_the_pattern() {
    use trellis_proto::data::v1::PublishRequest;
    use trellis_proto::data::v1::pub_sub_client::PubSubClient;
    let nats = trellis_tests::nats::NatsServer::start().await;
    let proxy = Proxy::builder()
        .pattern(trellis_tests::nats::nats_pattern(
            "nats",
            &["events"],
            &nats.url(),
        ))
        .start()
        .await;
    let mut ps = PubSubClient::new(proxy.channel().await);
    let publish = || PublishRequest {
        namespace: "events".into(),
        topic: "t".into(),
        payload: b"x".to_vec(),
        ..Default::default()
    };
    let mut keyed = tonic::Request::new(publish());
    keyed
        .metadata_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    let err = ps.publish(keyed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("\"nats\""), "{}", err.message());
    assert!(err.message().contains("idempotency"), "{}", err.message());
    ps.publish(publish())
        .await
        .expect("a publish without a key");
}
