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

#[tokio::test]
async fn cli_publish_and_subscribe() {
    let proxy = Proxy::builder().memstore("mem", &["default"]).start().await;
    let trellis = trellis_tests::bin("trellis");
    let subscriber = tokio::process::Command::new(&trellis)
        .args(["pubsub", "--addr", &proxy.addr])
        .args(["subscribe", "default", "news", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn trellis pubsub subscribe");
    let subscriber_pid = subscriber.id().expect("pid");
    // Publish until the subscriber (exiting after one message) has one:
    // there is no replay, so what is published before it is live is lost.
    trellis_tests::eventually("the CLI subscriber to get a message", || {
        let trellis = trellis.clone();
        let addr = proxy.addr.clone();
        async move {
            let out = tokio::process::Command::new(&trellis)
                .args(["pubsub", "--addr", &addr])
                .args(["publish", "default", "news", "hello", "--attr", "k=v"])
                .output()
                .await
                .ok()?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
                "prints the id"
            );
            trellis_tests::process_gone(subscriber_pid).then_some(())
        }
    })
    .await;
    let out = tokio::time::timeout(PATIENCE, subscriber.wait_with_output())
        .await
        .expect("subscriber exits")
        .expect("subscriber output");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
}
