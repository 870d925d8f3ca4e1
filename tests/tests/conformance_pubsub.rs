//! The pub/sub conformance kit against every pub/sub pattern: memstore and
//! trellis-nats through the real proxy, and memstore without it.

use pattern_sdk::conformance::kv::PatternProcess;
use pattern_sdk::conformance::pubsub::{self, Kit};
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_tests::nats::{NatsServer, nats_pattern};
use trellis_tests::{PATIENCE, Proxy, bin};

#[tokio::test]
async fn memstore_through_the_proxy() {
    let proxy = Proxy::builder()
        .memstore("mem", &["pubsub", "pubsub-other"])
        .start()
        .await;
    let kit = Kit::new(
        PubSubClient::new(proxy.channel().await),
        "pubsub",
        "pubsub-other",
    )
    .patience(PATIENCE);
    let report = pubsub::run_all(&kit).await;
    println!("{report}");
    report.assert_all_passed();
}

#[tokio::test]
async fn memstore_without_the_proxy() {
    let pattern = PatternProcess::spawn(&bin("trellis-memstore"), "mem", serde_json::json!({}))
        .await
        .expect("start memstore");
    let kit = Kit::new(PubSubClient::new(pattern.channel()), "a", "b").patience(PATIENCE);
    let report = pubsub::run_all(&kit).await;
    println!("{report}");
    report.assert_all_passed();
}

#[tokio::test]
async fn nats_through_the_proxy() {
    let nats = NatsServer::start().await;
    let proxy = Proxy::builder()
        .pattern(nats_pattern(
            "nats",
            &["events", "events-other"],
            &nats.url(),
        ))
        .start()
        .await;
    let kit = Kit::new(
        PubSubClient::new(proxy.channel().await),
        "events",
        "events-other",
    )
    .patience(PATIENCE);
    let report = pubsub::run_all(&kit).await;
    println!("{report}");
    if !report.all_passed() {
        panic!(
            "{report}\nproxy log:\n{}\nnats-server log:\n{}",
            proxy.log_text(),
            nats.log()
        );
    }
}
