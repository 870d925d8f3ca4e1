//! Idempotency keys end to end: the real proxy, the real memstore, over
//! gRPC and HTTP. What a replay must be — the first call's answer, marked
//! `idempotent-replayed`, without doing the write again — is checked by
//! making the second write observable: a value changed in between stays
//! changed, a Delete still answers `deleted: true`, a subscriber gets one
//! message.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::{Method, StatusCode};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{DeleteRequest, PublishRequest, SubscribeRequest};
use trellis_tests::http as web;
use trellis_tests::kv::{get, put};
use trellis_tests::{Proxy, eventually};

use trellis_tests::kv::{idempotent_replayed as replayed, with_idempotency_key as with_key};

fn reason(s: &Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn delete(ns: &str, key: &str) -> DeleteRequest {
    DeleteRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

async fn memstore() -> Proxy {
    Proxy::builder()
        .top("policies:\n  default:\n    idempotency: { retention: 2s }")
        .memstore("mem", &["m"])
        .start()
        .await
}

#[tokio::test]
async fn a_replayed_put_answers_the_first_result_without_writing_again() {
    let proxy = memstore().await;
    let mut kv = proxy.kv().await;
    let first = kv
        .put(with_key(put("m", "a", b"1"), "k-put"))
        .await
        .unwrap();
    assert!(!replayed(&first), "the first call runs");
    // Someone else writes the key in between.
    kv.put(put("m", "a", b"2")).await.unwrap();
    let again = kv
        .put(with_key(put("m", "a", b"1"), "k-put"))
        .await
        .unwrap();
    assert!(replayed(&again), "the retry is a replay");
    let value = kv.get(get("m", "a")).await.unwrap().into_inner().value;
    assert_eq!(value, b"2", "the replay did not write again");

    // The same key with another request is refused, naming the rule.
    let err = kv
        .put(with_key(put("m", "a", b"other"), "k-put"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED", "{err:?}");
    // The key is scoped by namespace: another namespace has its own.
    let proxy2 = Proxy::builder().memstore("mem", &["m", "n"]).start().await;
    let mut kv2 = proxy2.kv().await;
    kv2.put(with_key(put("m", "a", b"1"), "k")).await.unwrap();
    let other_ns = kv2.put(with_key(put("n", "a", b"1"), "k")).await.unwrap();
    assert!(!replayed(&other_ns));
}

#[tokio::test]
async fn a_replayed_delete_still_says_deleted_and_ten_at_once_delete_once() {
    let proxy = memstore().await;
    let mut kv = proxy.kv().await;
    kv.put(put("m", "d", b"x")).await.unwrap();
    let first = kv
        .delete(with_key(delete("m", "d"), "k-del"))
        .await
        .unwrap();
    assert!(first.get_ref().deleted);
    let again = kv
        .delete(with_key(delete("m", "d"), "k-del"))
        .await
        .unwrap();
    assert!(replayed(&again));
    assert!(
        again.get_ref().deleted,
        "the replay answers what the first call did"
    );

    // Ten duplicates at once: one executes, the others replay it.
    kv.put(put("m", "c", b"x")).await.unwrap();
    let channel = proxy.channel().await;
    let mut calls: FuturesUnordered<_> = (0..10)
        .map(|_| {
            let mut kv =
                trellis_proto::data::v1::key_value_client::KeyValueClient::new(channel.clone());
            async move { kv.delete(with_key(delete("m", "c"), "k-burst")).await }
        })
        .collect();
    let mut executed = 0;
    while let Some(r) = calls.next().await {
        let r = r.expect("each duplicate answers");
        assert!(r.get_ref().deleted, "every answer is the one execution's");
        executed += usize::from(!replayed(&r));
    }
    assert_eq!(executed, 1, "exactly one execution");
}

#[tokio::test]
async fn a_replayed_publish_delivers_once_and_answers_the_same_id() {
    let proxy = memstore().await;
    let mut ps = PubSubClient::new(proxy.channel().await);
    let mut sub = ps
        .subscribe(SubscribeRequest {
            namespace: "m".into(),
            topic: "t".into(),
            queue_group: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let publish = || PublishRequest {
        namespace: "m".into(),
        topic: "t".into(),
        payload: b"once".to_vec(),
        ..Default::default()
    };
    let first = ps.publish(with_key(publish(), "k-pub")).await.unwrap();
    let again = ps.publish(with_key(publish(), "k-pub")).await.unwrap();
    assert!(replayed(&again));
    assert_eq!(first.get_ref().message_id, again.get_ref().message_id);
    // A marker after both: the subscriber sees the message once, then it.
    ps.publish(PublishRequest {
        payload: b"marker".to_vec(),
        ..publish()
    })
    .await
    .unwrap();
    let m1 = sub.message().await.unwrap().unwrap();
    let m2 = sub.message().await.unwrap().unwrap();
    assert_eq!(m1.payload, b"once");
    assert_eq!(m2.payload, b"marker", "the replay published nothing");
}

#[tokio::test]
async fn bad_keys_are_refused_forged_fingerprints_ignored_and_records_expire() {
    let proxy = memstore().await;
    let mut kv = proxy.kv().await;
    let long = "k".repeat(256);
    let err = kv
        .put(with_key(put("m", "a", b"1"), &long))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad = err.get_details_bad_request().expect("BadRequest");
    assert_eq!(bad.field_violations[0].field, "idempotency-key");
    assert!(
        bad.field_violations[0].description.contains("1 to 255"),
        "{bad:?}"
    );

    // A client cannot pass its own fingerprint: the proxy computes it.
    let forged = |value: &[u8]| {
        let mut r = with_key(put("m", "f", value), "k-forge");
        r.metadata_mut()
            .insert("trellis-idempotency-fingerprint", "same".parse().unwrap());
        r
    };
    kv.put(forged(b"1")).await.unwrap();
    let err = kv.put(forged(b"2")).await.unwrap_err();
    assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED", "{err:?}");

    // After the retention (2 s here) the key is free again.
    kv.put(with_key(put("m", "e", b"1"), "k-exp"))
        .await
        .unwrap();
    eventually("the record to expire", || async {
        let r = kv.clone().put(with_key(put("m", "e", b"2"), "k-exp")).await;
        match r {
            Ok(r) if !replayed(&r) => Some(()),
            Err(e) if reason(&e) == "IDEMPOTENCY_KEY_REUSED" => None,
            other => panic!("unexpected {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn over_http_the_header_replays_and_reuse_is_422() {
    let proxy = memstore().await;
    let base = proxy.http.as_deref().unwrap();
    let url = format!("{base}/v1/namespaces/m/keys/h");
    let send = |body: &'static str, key: &'static str| {
        let url = url.clone();
        async move {
            web::send(
                Method::PUT,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("idempotency-key", key),
                ],
                body,
                false,
            )
            .await
        }
    };
    let first = send(r#"{"value":"MQ=="}"#, "\"k-http\"").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert!(!first.headers.contains_key("idempotent-replayed"));
    // A bare token names the same key as the structured string.
    let again = send(r#"{"value":"MQ=="}"#, "k-http").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let reused = send(r#"{"value":"Mg=="}"#, "k-http").await;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reused.text()
    );
    assert_eq!(reused.json()["reason"], "IDEMPOTENCY_KEY_REUSED");
    let malformed = send(r#"{"value":"MQ=="}"#, "\"open").await;
    assert_eq!(
        malformed.status,
        StatusCode::BAD_REQUEST,
        "{}",
        malformed.text()
    );
}
