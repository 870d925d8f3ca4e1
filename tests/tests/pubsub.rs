//! Pub/sub through the real proxy, beyond the conformance kit: what the
//! proxy adds (routing to patterns without PubSub, ending subscriptions on
//! restart and shutdown) and the `trellis pubsub` CLI.

use std::time::{Duration, Instant};

use pattern_sdk::conformance::pubsub::Kit;
use tonic::Code;
use trellis_proto::admin::v1::PatternActionRequest;
use trellis_proto::data::v1::PublishRequest;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_tests::{PATIENCE, Proxy};

#[tokio::test]
async fn a_pattern_without_pubsub_is_unimplemented_naming_what_it_implements() {
    let proxy = Proxy::builder()
        .chaos("kvonly", &["keys"], "")
        .start()
        .await;
    let mut client = PubSubClient::new(proxy.channel().await);
    let err = client
        .publish(PublishRequest {
            namespace: "keys".into(),
            topic: "t".into(),
            payload: b"x".to_vec(),
            attributes: Default::default(),
        })
        .await
        .expect_err("publish to a KV-only pattern");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    for want in [
        "\"kvonly\"",
        "trellis.data.v1.KeyValue",
        "trellis.data.v1.PubSub",
    ] {
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }
    let kit = Kit::new(client, "keys", "keys");
    let err = kit
        .subscribe("t", None)
        .await
        .err()
        .expect("subscribe fails");
    assert!(err.contains("Unimplemented"), "{err}");
}

#[tokio::test]
async fn a_pattern_restart_ends_subscriptions_with_unavailable_at_once() {
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        // A long grace: an open subscription that held up the stop would
        // make the restart take this long.
        .with("stop_grace: 60s")
        .start()
        .await;
    let kit = Kit::new(
        PubSubClient::new(proxy.channel().await),
        "default",
        "default",
    )
    .patience(PATIENCE);
    let topic = kit.topic("restart");
    let mut sub = kit.subscribe(&topic, None).await.unwrap();
    kit.ready(&topic, &mut [&mut sub]).await.unwrap();

    let started = Instant::now();
    proxy
        .admin()
        .await
        .restart_pattern(PatternActionRequest { name: "mem".into() })
        .await
        .expect("restart");
    let err = sub.next(PATIENCE).await.expect_err("the stream ends");
    assert!(err.contains("Unavailable"), "{err}");
    assert!(err.contains("subscribe again"), "{err}");
    proxy.wait_serving("mem").await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the restart waited out stop_grace: the open subscription held up the stop"
    );

    // Subscribing again works against the new process.
    let mut sub = kit.subscribe(&topic, None).await.unwrap();
    kit.ready(&topic, &mut [&mut sub]).await.unwrap();
    kit.publish(&topic, b"again").await.unwrap();
    assert_eq!(sub.next(PATIENCE).await.unwrap().payload, b"again");
}

#[tokio::test]
async fn proxy_shutdown_ends_subscriptions_and_does_not_wait_for_them() {
    let mut proxy = Proxy::builder()
        .top("shutdown_grace: 60s")
        .memstore("mem", &["default"])
        .start()
        .await;
    let kit = Kit::new(
        PubSubClient::new(proxy.channel().await),
        "default",
        "default",
    )
    .patience(PATIENCE);
    let topic = kit.topic("shutdown");
    let mut sub = kit.subscribe(&topic, None).await.unwrap();
    kit.ready(&topic, &mut [&mut sub]).await.unwrap();

    let started = Instant::now();
    assert_eq!(proxy.terminate().await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "shutdown waited out shutdown_grace for an open subscription"
    );
    // The stream ended with a status (or the connection closed under it).
    assert!(sub.next(PATIENCE).await.is_err());
}
