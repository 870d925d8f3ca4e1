//! Traces from the client through the proxy into the pattern, received by
//! a real OTLP/gRPC collector service started by the test (the
//! `opentelemetry-proto` crate's tonic server): one call with a given
//! `traceparent` yields a proxy server span, a proxy client span and a
//! pattern server span in that trace, each the child of the one before.

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_tests::otlp::{Collector, Got, collector};
use trellis_tests::{Proxy, eventually};

async fn proxy(collector_url: &str) -> Proxy {
    Proxy::builder()
        .top(&format!(
            "telemetry:\n  traces:\n    endpoint: {collector_url}\n    service_name: trellis-test\n"
        ))
        // Export within ~100 ms instead of the default 5 s batches.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .memstore("mem", &["default"])
        .start()
        .await
}

/// Waits for the three spans of `trace` and checks how they hang together.
async fn chain(c: &Collector, trace: &str, caller_span: &str, method: &str) {
    let (server, client, pattern) = eventually("the proxy's and the pattern's spans", || {
        let spans: Vec<Got> = c
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        async move {
            let server = spans
                .iter()
                .find(|s| s.service == "trellis-test" && s.kind == SpanKind::Server as i32)?
                .clone();
            let client = spans
                .iter()
                .find(|s| s.service == "trellis-test" && s.kind == SpanKind::Client as i32)?
                .clone();
            let pattern = spans
                .iter()
                .find(|s| s.service == "mem" && s.kind == SpanKind::Server as i32)?
                .clone();
            Some((server, client, pattern))
        }
    })
    .await;
    assert_eq!(
        server.parent_span_id, caller_span,
        "the proxy continues the caller's trace"
    );
    assert_eq!(
        client.parent_span_id, server.span_id,
        "the hop is a child of the call"
    );
    assert_eq!(
        pattern.parent_span_id, client.span_id,
        "the pattern continues under the hop"
    );
    for s in [&server, &client, &pattern] {
        assert_eq!(s.name, method, "{s:?}");
        assert_eq!(s.attributes["rpc.system.name"], "grpc", "{s:?}");
        assert_eq!(s.attributes["rpc.method"], method, "{s:?}");
        assert_eq!(s.attributes["rpc.response.status_code"], "OK", "{s:?}");
    }
    for s in [&server, &client] {
        assert_eq!(s.attributes["trellis.namespace"], "default", "{s:?}");
        assert_eq!(s.attributes["trellis.pattern"], "mem", "{s:?}");
    }
}

#[tokio::test]
async fn a_grpc_call_is_one_trace_from_the_client_into_the_pattern() {
    let (c, url) = collector().await;
    let proxy = proxy(&url).await;
    let mut kv = proxy.kv().await;
    kv.put(PutRequest {
        namespace: "default".into(),
        key: "k".into(),
        value: b"v".to_vec(),
        ttl: None,
    })
    .await
    .unwrap();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(GetRequest {
        namespace: "default".into(),
        key: "k".into(),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{caller}-01").parse().unwrap(),
    );
    kv.get(req).await.unwrap();
    chain(&c, trace, caller, "trellis.data.v1.KeyValue/Get").await;
}

#[tokio::test]
async fn an_http_call_is_one_trace_too() {
    let (c, url) = collector().await;
    let proxy = proxy(&url).await;
    let http = proxy.http.clone().unwrap();
    let r = trellis_tests::http::put_json(
        &format!("{http}/v1/namespaces/default/keys/k"),
        r#"{"value":"aGk="}"#,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller = "b7ad6b7169203331";
    let r = trellis_tests::http::send(
        http::Method::GET,
        &format!("{http}/v1/namespaces/default/keys/k"),
        &[("traceparent", &format!("00-{trace}-{caller}-01"))],
        "",
        false,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    chain(&c, trace, caller, "trellis.data.v1.KeyValue/Get").await;
}
