//! One structured log line per data call (target `trellis::calls`): failures
//! at `info`, successes at `debug`, by default; each with the method,
//! namespace, pattern, code, duration, request id and trace id.

use tonic::Code;
use trellis_proto::data::v1::GetRequest;
use trellis_tests::{Proxy, eventually};

fn get(ns: &str, key: &str, request_id: &str) -> tonic::Request<GetRequest> {
    let mut req = tonic::Request::new(GetRequest {
        namespace: ns.into(),
        key: key.into(),
    });
    req.metadata_mut()
        .insert("x-request-id", request_id.parse().unwrap());
    req.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    req
}

/// The call-log lines the proxy wrote, parsed.
fn call_lines(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "trellis::calls")
        .collect()
}

fn line_for<'a>(lines: &'a [serde_json::Value], request_id: &str) -> Option<&'a serde_json::Value> {
    lines
        .iter()
        .find(|v| v["fields"]["request_id"] == request_id)
}

#[tokio::test]
async fn failures_are_logged_at_info_and_successes_only_at_debug() {
    let proxy = Proxy::builder()
        .log_level("info")
        .memstore("mem", &["default"])
        .start()
        .await;
    let mut kv = proxy.kv().await;
    let missing = kv
        .get(get("default", "nope", "rid-missing"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let unknown = kv
        .get(get("elsewhere", "k", "rid-unknown"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let lines = eventually("both failures logged", || {
        let lines = call_lines(&proxy);
        async move {
            (line_for(&lines, "rid-missing").is_some() && line_for(&lines, "rid-unknown").is_some())
                .then_some(lines)
        }
    })
    .await;
    let missing = line_for(&lines, "rid-missing").unwrap();
    assert_eq!(missing["level"], "INFO");
    let f = &missing["fields"];
    assert_eq!(f["method"], "trellis.data.v1.KeyValue/Get");
    assert_eq!(f["namespace"], "default");
    assert_eq!(f["pattern"], "mem");
    assert_eq!(
        f["code"], "NOT_FOUND",
        "the pattern's own answer: {missing}"
    );
    assert_eq!(f["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(f["ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{missing}");
    let unknown = &line_for(&lines, "rid-unknown").unwrap()["fields"];
    assert_eq!(unknown["code"], "NOT_FOUND", "refused by the proxy");
    assert_eq!(unknown["pattern"], "");

    // A success is a debug line: filtered out at `info`. Write a marker
    // failure after it, so "not logged" is judged once later lines exist.
    kv.put(trellis_proto::data::v1::PutRequest {
        namespace: "default".into(),
        key: "k".into(),
        value: b"v".to_vec(),
        ttl: None,
    })
    .await
    .unwrap();
    kv.get(get("default", "k", "rid-ok")).await.unwrap();
    let _ = kv.get(get("default", "nope", "rid-marker")).await;
    let lines = eventually("the marker logged", || {
        let lines = call_lines(&proxy);
        async move { line_for(&lines, "rid-marker").is_some().then_some(lines) }
    })
    .await;
    assert!(
        line_for(&lines, "rid-ok").is_none(),
        "a success at info: {lines:?}"
    );
}

#[tokio::test]
async fn successes_can_be_logged_too() {
    let proxy = Proxy::builder()
        .log_level("info")
        .top("telemetry:\n  call_log:\n    successes: info\n")
        .memstore("mem", &["default"])
        .start()
        .await;
    let mut kv = proxy.kv().await;
    let _ = kv.get(get("default", "nope", "rid-1")).await;
    kv.list(trellis_proto::data::v1::ListRequest {
        namespace: "default".into(),
        prefix: String::new(),
        page_size: 0,
        page_token: String::new(),
    })
    .await
    .unwrap();
    eventually("a success logged", || {
        let lines = call_lines(&proxy);
        async move {
            lines
                .iter()
                .any(|v| {
                    v["fields"]["code"] == "OK"
                        && v["fields"]["method"] == "trellis.data.v1.KeyValue/List"
                })
                .then_some(())
        }
    })
    .await;
}
