//! `trellis-echo` on its own, no proxy: started the way the proxy starts a
//! pattern (handshake, Initialize, Start, SERVING) and called with plain
//! tonic clients, so the proxy tests built on it can trust what it reports.

use std::time::Duration;

use pattern_sdk::conformance::kv::PatternProcess;
use tonic::Code;
use tonic_types::StatusExt;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{GetRequest, SubscribeRequest};
use trellis_tests::{PATIENCE, bin, eventually};

async fn echo(config: serde_json::Value) -> PatternProcess {
    PatternProcess::spawn_with_patience(&bin("trellis-echo"), "echo", config, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("trellis-echo did not start: {e}"))
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        namespace: "ns".into(),
        key: key.into(),
    }
}

async fn get_text(kv: &mut KeyValueClient<tonic::transport::Channel>, key: &str) -> String {
    let value = kv.get(get(key)).await.expect("Get").into_inner().value;
    String::from_utf8(value).expect("UTF-8 value")
}

fn subscribe(topic: &str) -> SubscribeRequest {
    SubscribeRequest {
        namespace: "ns".into(),
        topic: topic.into(),
        queue_group: String::new(),
    }
}

#[tokio::test]
async fn get_headers_shows_the_raw_request_headers() {
    let pattern = echo(serde_json::json!({})).await;
    let res = pattern.kv().get(get("headers")).await.expect("Get headers");
    let pid = res.metadata().get("x-echo-pid").map(|v| v.to_str().ok());
    assert_eq!(pid, Some(pattern.pid().map(|p| p.to_string()).as_deref()));
    let headers: serde_json::Value =
        serde_json::from_slice(&res.into_inner().value).expect("JSON headers");
    assert_eq!(headers["te"], serde_json::json!(["trailers"]), "{headers}");
    assert_eq!(
        headers["content-type"],
        serde_json::json!(["application/grpc"]),
        "{headers}"
    );
    assert_eq!(
        headers[":path"],
        serde_json::json!(["/trellis.data.v1.KeyValue/Get"]),
        "{headers}"
    );
    assert!(pattern.stop(PATIENCE).await.expect("stop"), "exit code 0");
}

#[tokio::test]
async fn get_fail_returns_known_details_and_trailers() {
    let pattern = echo(serde_json::json!({})).await;
    let status = pattern.kv().get(get("fail")).await.expect_err("fail fails");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "echo: failing on purpose");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("ECHO_FAIL", "trellis.echo")
    );
    assert_eq!(info.metadata.get("k").map(String::as_str), Some("v"));
    let meta = status.metadata();
    assert_eq!(
        meta.get("x-echo-trailer").and_then(|v| v.to_str().ok()),
        Some("t1")
    );
    let bin = meta
        .get_bin("x-echo-bin-bin")
        .and_then(|v| v.to_bytes().ok());
    assert_eq!(bin.as_deref(), Some(&[0u8, 1, 2, 255][..]));
}

#[tokio::test]
async fn get_ok_trailers_adds_a_header_and_a_trailer() {
    let pattern = echo(serde_json::json!({})).await;
    // tonic merges a unary response's trailers into its metadata.
    let res = pattern.kv().get(get("ok-trailers")).await.expect("Get");
    let meta = res.metadata();
    assert_eq!(
        meta.get("x-echo-header").and_then(|v| v.to_str().ok()),
        Some("h1")
    );
    assert_eq!(
        meta.get("x-echo-trailer").and_then(|v| v.to_str().ok()),
        Some("t2")
    );
    assert_eq!(res.into_inner().value, b"ok");
}

#[tokio::test]
async fn pub_sub_counts_and_tracks_open_subscriptions() {
    let pattern = echo(serde_json::json!({
        "interfaces": ["trellis.data.v1.KeyValue", "trellis.data.v1.PubSub"]
    }))
    .await;
    let mut pubsub = PubSubClient::new(pattern.channel());
    let mut counted = pubsub
        .subscribe(subscribe("count:3"))
        .await
        .expect("Subscribe count:3")
        .into_inner();
    let mut payloads = Vec::new();
    while let Some(m) = counted.message().await.expect("stream ends OK") {
        payloads.push(String::from_utf8(m.payload).expect("UTF-8 payload"));
    }
    assert_eq!(payloads, ["0", "1", "2"]);

    let mut open = pubsub
        .subscribe(subscribe("news"))
        .await
        .expect("Subscribe news")
        .into_inner();
    let first = open.message().await.expect("first message");
    assert_eq!(first.map(|m| m.payload), Some(b"hello".to_vec()));
    let mut kv = pattern.kv();
    assert_eq!(get_text(&mut kv, "subscriptions").await, "1");
    drop(open);
    eventually("the cancelled subscription to close", || {
        let mut kv = kv.clone();
        async move { (get_text(&mut kv, "subscriptions").await == "0").then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn unknown_config_fields_are_rejected_by_name() {
    let err = PatternProcess::spawn_with_patience(
        &bin("trellis-echo"),
        "echo",
        serde_json::json!({ "interfaces": ["trellis.data.v1.Nope"] }),
        PATIENCE,
    )
    .await
    .err()
    .expect("Initialize fails");
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(err.contains("config.interfaces[0]"), "{err}");
}

#[tokio::test]
async fn stop_exits_zero_even_with_a_subscription_open() {
    let pattern = echo(serde_json::json!({
        "interfaces": ["trellis.data.v1.PubSub"]
    }))
    .await;
    let mut open = PubSubClient::new(pattern.channel())
        .subscribe(subscribe("forever"))
        .await
        .expect("Subscribe")
        .into_inner();
    assert!(open.message().await.expect("hello").is_some());
    // KeyValue is not claimed, so it is not served.
    let status = pattern.kv().get(get("x")).await.expect_err("no KeyValue");
    assert_eq!(status.code(), Code::Unimplemented);
    let exited_zero = pattern
        .stop(Duration::from_millis(200))
        .await
        .expect("exits");
    assert!(exited_zero, "exit code 0");
}

#[tokio::test]
async fn keys_sleep_count_and_grow() {
    let pattern = echo(serde_json::json!({})).await;
    let mut kv = pattern.kv().max_decoding_message_size(64 << 20);
    for _ in 0..2 {
        kv.put(trellis_proto::data::v1::PutRequest {
            namespace: "ns".into(),
            key: "k".into(),
            value: b"v".to_vec(),
            ttl: None,
        })
        .await
        .expect("Put");
    }
    assert_eq!(get_text(&mut kv, "puts").await, "2");
    assert_eq!(get_text(&mut kv, "sleep:10").await, "slept");
    assert_eq!(get_text(&mut kv, "plain/key").await, "plain/key");
    let big = kv
        .get(get("big:5000000"))
        .await
        .expect("Get big")
        .into_inner();
    assert_eq!(big.value.len(), 5_000_000);
    assert_eq!(big.value[251..254], [0, 1, 2]);
    let bad = kv.get(get("sleep:soon")).await.expect_err("bad number");
    assert_eq!(bad.code(), Code::InvalidArgument);
}
