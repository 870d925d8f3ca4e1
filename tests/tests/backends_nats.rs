//! trellis-nats when its NATS server dies: a private nats-server is
//! SIGKILLed and restarted on the same port while the real proxy serves a
//! NATS namespace and a memstore namespace.
//!
//! What a NATS outage loses (core NATS stores nothing):
//! - every message published to the topic while the server is down: the
//!   pattern refuses them (UNAVAILABLE), and a NATS client publishing
//!   directly has nowhere to send them;
//! - messages in flight when the server died (accepted by the server but
//!   not yet delivered, or still in the client's buffer or socket);
//! - messages published by other NATS clients after the restart but before
//!   this pattern has reconnected and re-subscribed.
//!
//! What survives: the subscriptions. A subscriber's stream through the
//! proxy stays open across the outage, and async-nats re-subscribes on
//! reconnect, so it receives what is published after the restart.

use std::time::{Duration, Instant};

use pattern_sdk::conformance::pubsub::Kit;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use trellis_proto::admin::v1::PatternState;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{GetRequest, PublishRequest, PutRequest};
use trellis_tests::nats::{NatsServer, nats_pattern};
use trellis_tests::{PATIENCE, Proxy};

/// Health of `service` as the proxy reports it now.
async fn health(proxy: &Proxy, service: &str) -> Option<ServingStatus> {
    let mut client = proxy.health().await;
    let resp = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(resp.into_inner().status())
}

fn publish(ns: &str, topic: &str, payload: &[u8]) -> PublishRequest {
    PublishRequest {
        namespace: ns.into(),
        topic: topic.into(),
        payload: payload.to_vec(),
        attributes: Default::default(),
    }
}

#[tokio::test]
async fn nats_killed_and_restarted() {
    let mut nats = NatsServer::start().await;
    // A long request_timeout: a publish that hung on the dead server would
    // end as DEADLINE_EXCEEDED after it, so UNAVAILABLE proves a prompt answer.
    let proxy = Proxy::builder()
        .top("request_timeout: 60s")
        .pattern(nats_pattern("nats", &["events"], &nats.url()))
        .memstore("mem", &["default"])
        .start()
        .await;
    let client = PubSubClient::new(proxy.channel().await);
    let events = Kit::new(client.clone(), "events", "events").patience(PATIENCE);
    let local = Kit::new(client.clone(), "default", "default").patience(PATIENCE);
    let topic = events.topic("outage");

    // A subscriber opened before the outage, proven live.
    let mut sub = events.subscribe(&topic, None).await.unwrap();
    events.ready(&topic, &mut [&mut sub]).await.unwrap();
    events.publish(&topic, b"before").await.unwrap();
    let m = sub.next(PATIENCE).await.unwrap();
    assert_eq!(m.payload, b"before");

    nats.kill().await;

    // The pattern reports NOT_SERVING (the proxy sees it through health and
    // the admin API) and is not restarted for it.
    let pid_before = proxy.pattern("nats").await.pid;
    proxy
        .wait_pattern("nats", "nats pattern NOT_SERVING", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    assert_eq!(
        health(&proxy, "nats").await,
        Some(ServingStatus::NotServing)
    );
    let p = proxy.pattern("nats").await;
    assert_eq!(
        p.pid, pid_before,
        "a backend outage must not restart the pattern"
    );

    // Publish answers UNAVAILABLE at once, not after the 60 s deadline.
    let mut pubsub = client.clone();
    let started = Instant::now();
    let err = pubsub
        .publish(publish("events", &topic, b"lost"))
        .await
        .expect_err("publish while NATS is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("nats"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the answer must not wait for the deadline"
    );

    // Isolation: the memstore namespace keeps serving keys and pub/sub.
    let mut kv = proxy.kv().await;
    kv.put(PutRequest {
        namespace: "default".into(),
        key: "k".into(),
        value: b"v".to_vec(),
        ttl: None,
    })
    .await
    .expect("memstore put while NATS is down");
    let got = kv
        .get(GetRequest {
            namespace: "default".into(),
            key: "k".into(),
        })
        .await
        .expect("memstore get while NATS is down");
    assert_eq!(got.into_inner().value, b"v");
    let local_topic = local.topic("meanwhile");
    let mut local_sub = local.subscribe(&local_topic, None).await.unwrap();
    local
        .ready(&local_topic, &mut [&mut local_sub])
        .await
        .unwrap();
    local.publish(&local_topic, b"still here").await.unwrap();
    assert_eq!(
        local_sub.next(PATIENCE).await.unwrap().payload,
        b"still here"
    );
    assert_eq!(health(&proxy, "mem").await, Some(ServingStatus::Serving));

    nats.restart().await;

    // Back to SERVING without a restart of the pattern…
    proxy.wait_serving("nats").await;
    assert_eq!(proxy.pattern("nats").await.pid, pid_before);

    // …and the subscription opened before the kill is live again: probes
    // published after the restart reach it (bounded polling: the client
    // re-subscribes as part of reconnecting).
    events.ready(&topic, &mut [&mut sub]).await.unwrap();
    events.publish(&topic, b"after").await.unwrap();
    let m = sub.next(PATIENCE).await.unwrap();
    assert_eq!(
        m.payload, b"after",
        "the message refused during the outage must not appear"
    );
    // Nothing else arrived: "lost" was refused, never delivered.
    assert!(sub.drain().unwrap().is_empty());
}

/// NATS is not up when the pattern starts: the namespace answers
/// UNAVAILABLE (the proxy holds the pattern in STARTING until its first
/// SERVING health check) and serves as soon as NATS is there.
#[tokio::test]
async fn nats_down_at_start_serves_once_it_comes_up() {
    // A server started and killed at once, so its port is known and free.
    let mut nats = NatsServer::start().await;
    nats.kill().await;
    let proxy = Proxy::builder()
        .pattern(nats_pattern("nats", &["events"], &nats.url()))
        .spawn()
        .await;
    let err = PubSubClient::new(proxy.channel().await)
        .publish(publish("events", "t", b"x"))
        .await
        .expect_err("publish before NATS is up");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    nats.restart().await;
    proxy.wait_serving("nats").await;
    let kit =
        Kit::new(PubSubClient::new(proxy.channel().await), "events", "events").patience(PATIENCE);
    let topic = kit.topic("late");
    let mut sub = kit.subscribe(&topic, None).await.unwrap();
    kit.ready(&topic, &mut [&mut sub]).await.unwrap();
    kit.publish(&topic, b"hello").await.unwrap();
    assert_eq!(sub.next(PATIENCE).await.unwrap().payload, b"hello");
}
