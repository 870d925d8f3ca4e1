//! The data plane through the real proxy: what it forwards, what it adds,
//! and what it refuses. Most tests run `trellis-echo`, a pattern on the raw
//! protocol that shows exactly what reached it and answers with known bytes,
//! so "passed through unchanged" is checked byte for byte against a call
//! made straight to the pattern.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Method;
use tonic::Code;
use tonic_types::StatusExt;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{GetRequest, PutRequest, SubscribeRequest};
use trellis_tests::h2raw::{self, Exchange};
use trellis_tests::{PATIENCE, Proxy, eventually};

const GET: &str = "/trellis.data.v1.KeyValue/Get";

fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

fn put(ns: &str, key: &str, value: Vec<u8>) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value,
        ttl: None,
    }
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// The echo pattern's own address, to call it around the proxy.
async fn pattern_addr(proxy: &Proxy, name: &str) -> String {
    let endpoint = proxy.pattern(name).await.endpoint;
    endpoint
        .strip_prefix("tcp://")
        .unwrap_or_else(|| panic!("not a tcp endpoint: {endpoint}"))
        .to_string()
}

/// What `Get headers` says reached the pattern.
fn seen_by_pattern(value: &[u8]) -> BTreeMap<String, Vec<String>> {
    serde_json::from_slice(value).expect("echo's headers JSON")
}

async fn echo(config: &str) -> Proxy {
    Proxy::builder().echo("echo", &["e"], config).start().await
}

#[tokio::test]
async fn a_keyvalue_call_on_a_pattern_without_keyvalue_is_unimplemented_naming_its_interfaces() {
    let proxy = Proxy::builder()
        .echo(
            "subonly",
            &["topics"],
            "interfaces: [trellis.data.v1.PubSub]",
        )
        .start()
        .await;
    let err = proxy
        .kv()
        .await
        .get(get("topics", "k"))
        .await
        .expect_err("KeyValue on a PubSub-only pattern");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert_eq!(reason(&err), "INTERFACE_NOT_IMPLEMENTED");
    for want in [
        "\"topics\"",
        "\"subonly\"",
        "implements trellis.data.v1.PubSub",
        "not trellis.data.v1.KeyValue",
    ] {
        assert!(err.message().contains(want), "{want}: {}", err.message());
    }

    // The same refusal over HTTP: both doors share the stack.
    let url = format!(
        "{}/v1/namespaces/topics/keys/k",
        proxy.http.as_ref().unwrap()
    );
    let r = trellis_tests::http::get(&url).await;
    assert_eq!(r.status.as_u16(), 501, "{}", r.text());
    assert_eq!(r.json()["reason"], "INTERFACE_NOT_IMPLEMENTED");
}

#[tokio::test]
async fn metadata_is_forwarded_and_transport_headers_are_not() {
    let proxy = echo("").await;
    let addr = host_port(&proxy.addr).to_string();

    let r = h2raw::call(
        &addr,
        GET,
        &[
            ("authorization", "Bearer s3cret"),
            ("x-custom", "one"),
            ("x-custom", "two"),
            ("x-trace-bin", "AAEC/w"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("user-agent", "raw-h2-test/1"),
            ("grpc-timeout", "3S"),
            ("grpc-previous-rpc-attempts", "2"),
            ("grpc-accept-encoding", "gzip"),
            ("x-request-id", "rid-42"),
            ("trellis-pattern-secret", "a-guess"),
        ],
        h2raw::frame(&get("e", "headers")),
    )
    .await;
    assert_eq!(r.status_field("grpc-status").unwrap(), "0", "{r:?}");
    let value = trellis_proto::data::v1::GetResponse::decode_framed(&r.body);
    let seen = seen_by_pattern(&value);
    assert_eq!(seen["authorization"], ["Bearer s3cret"]);
    assert_eq!(
        seen["x-custom"],
        ["one", "two"],
        "repeated metadata in order"
    );
    assert_eq!(seen["x-trace-bin"], ["AAEC/w"], "binary metadata unchanged");
    assert_eq!(seen["user-agent"], ["raw-h2-test/1"]);
    assert_eq!(
        seen["x-request-id"],
        ["rid-42"],
        "a valid request id is kept"
    );
    assert_eq!(seen["te"], ["trailers"]);
    assert_eq!(seen["content-type"], ["application/grpc"]);
    // The pattern's secret replaces whatever a client sent in its name.
    let secret = &seen[trellis_proto::protocol::SECRET_HEADER];
    assert_eq!(secret.len(), 1, "{secret:?}");
    assert!(
        secret[0].len() == 64 && secret[0].bytes().all(|b| b.is_ascii_hexdigit()),
        "{secret:?}"
    );
    assert_eq!(seen[":path"], [GET]);
    for gone in ["grpc-previous-rpc-attempts", "grpc-accept-encoding", "host"] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the pattern: {seen:?}"
        );
    }
    // The proxy's own deadline for the hop: what is left of the client's 3 s.
    let timeout = &seen["grpc-timeout"];
    assert_eq!(timeout.len(), 1, "{timeout:?}");
    let left = parse_grpc_timeout(&timeout[0]);
    // At most the client's 3 s plus the proxy's margin for the pattern.
    assert!(
        left > Duration::ZERO && left <= Duration::from_millis(3020),
        "{left:?}"
    );

    // No request id, or an unusable one: the proxy mints one.
    for sent in [None, Some("has space")] {
        let md: Vec<(&str, &str)> = sent.map(|v| ("x-request-id", v)).into_iter().collect();
        let r = h2raw::call(&addr, GET, &md, h2raw::frame(&get("e", "headers"))).await;
        let seen = seen_by_pattern(&trellis_proto::data::v1::GetResponse::decode_framed(
            &r.body,
        ));
        let id = &seen["x-request-id"];
        assert_eq!(id.len(), 1);
        assert_eq!(id[0].len(), 36, "a UUID: {id:?}");
        assert_ne!(Some(id[0].as_str()), sent);
        // Without a client deadline the hop gets request_timeout (5 s).
        let left = parse_grpc_timeout(&seen["grpc-timeout"][0]);
        assert!(
            left > Duration::from_secs(3) && left <= Duration::from_millis(5020),
            "{left:?}"
        );
    }

    // Over HTTP/1.1: connection-specific headers stop at the gateway.
    let http = proxy.http.as_ref().unwrap();
    let r = trellis_tests::http::send(
        Method::GET,
        &format!("{http}/v1/namespaces/e/keys/headers"),
        &[
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
        "",
        false,
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text());
    let value = base64_value(&r.json());
    let seen = seen_by_pattern(&value);
    for gone in [
        "connection",
        "keep-alive",
        "x-hop",
        "proxy-authorization",
        "host",
    ] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the pattern: {seen:?}"
        );
    }
    assert_eq!(
        seen["traceparent"],
        ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]
    );
    assert_eq!(
        seen["x-request-id"],
        [r.headers["x-request-id"].to_str().unwrap()],
        "the pattern sees the id the HTTP client is told"
    );
}

#[tokio::test]
async fn trailers_and_error_details_reach_the_client_byte_for_byte() {
    // Over TCP, so the test can call the pattern around the proxy (echo
    // does not check the pattern secret).
    let proxy = Proxy::builder()
        .echo("echo", &["e"], "")
        .with("transport: tcp")
        .start()
        .await;
    let via_proxy = host_port(&proxy.addr).to_string();
    let direct = pattern_addr(&proxy, "echo").await;
    for key in ["fail", "ok-trailers", "big:100000", "plain"] {
        let body = h2raw::frame(&get("e", key));
        let a: Exchange = h2raw::call(&direct, GET, &[], body.clone()).await;
        let b: Exchange = h2raw::call(&via_proxy, GET, &[], body).await;
        assert_eq!(
            a.pattern_fields(),
            b.pattern_fields(),
            "{key}: headers and trailers"
        );
        assert_eq!(a.body, b.body, "{key}: body bytes");
        assert_eq!(
            a.trailers.is_some(),
            b.trailers.is_some(),
            "{key}: trailers-only stays trailers-only"
        );
    }
    // And a client library reads the pattern's error as the pattern made it.
    let err = proxy.kv().await.get(get("e", "fail")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "echo: failing on purpose");
    let info = err.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("ECHO_FAIL", "trellis.echo")
    );
    assert_eq!(err.metadata().get("x-echo-trailer").unwrap(), "t1");
    assert_eq!(
        err.metadata()
            .get_bin("x-echo-bin-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        [0, 1, 2, 255]
    );
}

#[tokio::test]
async fn messages_over_4_mib_are_refused_both_ways() {
    let proxy = echo("").await;
    let limit = 4 * 1024 * 1024;
    let mut kv = KeyValueClient::new(proxy.channel().await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    let err = kv.put(put("e", "k", vec![7; limit])).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "MESSAGE_TOO_LARGE");
    assert!(err.message().contains("4194304"), "{}", err.message());
    let puts = kv.get(get("e", "puts")).await.unwrap().into_inner().value;
    assert_eq!(puts, b"0", "the oversized Put never reached the pattern");

    kv.put(put("e", "k", vec![7; limit - 64]))
        .await
        .expect("a Put under the limit");
    let puts = kv.get(get("e", "puts")).await.unwrap().into_inner().value;
    assert_eq!(puts, b"1");

    let err = kv.get(get("e", "big:5000000")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "MESSAGE_TOO_LARGE");
    assert!(
        err.message().contains("\"echo\""),
        "names the pattern: {}",
        err.message()
    );
    let fine = kv
        .get(get("e", "big:4000000"))
        .await
        .expect("a value under the limit");
    assert_eq!(fine.into_inner().value.len(), 4_000_000);
}

#[tokio::test]
async fn a_slow_pattern_gets_deadline_exceeded_at_the_callers_deadline() {
    let proxy = Proxy::builder()
        .top("request_timeout: 2s\n")
        .echo("echo", &["e"], "")
        .start()
        .await;
    let addr = host_port(&proxy.addr).to_string();
    // The client's deadline (raw, so no client-side timer races the proxy).
    let r = h2raw::call(
        &addr,
        GET,
        &[("grpc-timeout", "300m")],
        h2raw::frame(&get("e", "sleep:60000")),
    )
    .await;
    assert_eq!(r.status_field("grpc-status").unwrap(), "4", "{r:?}");
    let message = r
        .status_field("grpc-message")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(message.contains("echo"), "{message}");
    // request_timeout bounds a call without a client deadline.
    let err = proxy
        .kv()
        .await
        .get(get("e", "sleep:60000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "PATTERN_TIMEOUT");
    assert!(err.message().contains("\"echo\""), "{}", err.message());
    assert!(err.message().contains("2s"), "{}", err.message());
}

#[tokio::test]
async fn subscriptions_are_cancelled_both_ways() {
    let proxy = echo("interfaces: [trellis.data.v1.KeyValue, trellis.data.v1.PubSub]").await;
    let channel = proxy.channel().await;
    let mut kv = KeyValueClient::new(channel.clone());
    let mut pubsub = PubSubClient::new(channel);
    let open = |kv: KeyValueClient<tonic::transport::Channel>| async move {
        let mut kv = kv;
        let v = kv
            .get(get("e", "subscriptions"))
            .await
            .unwrap()
            .into_inner()
            .value;
        String::from_utf8(v).unwrap()
    };

    // The pattern ends the stream: the client sees every message, then OK.
    let mut stream = pubsub
        .subscribe(SubscribeRequest {
            namespace: "e".into(),
            topic: "count:3".into(),
            queue_group: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.expect("ends OK") {
        got.push(String::from_utf8(m.payload).unwrap());
    }
    assert_eq!(got, ["0", "1", "2"]);

    // The client goes away: the pattern's subscription ends too.
    let mut stream = pubsub
        .subscribe(SubscribeRequest {
            namespace: "e".into(),
            topic: "forever".into(),
            queue_group: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("first message");
    assert_eq!(first.payload, b"hello");
    eventually("the pattern has one open subscription", || {
        let kv = kv.clone();
        async move { (open(kv).await == "1").then_some(()) }
    })
    .await;
    drop(stream);
    eventually("the pattern saw the cancellation", || {
        let kv = kv.clone();
        async move { (open(kv).await == "0").then_some(()) }
    })
    .await;
    assert_eq!(
        kv.get(get("e", "x")).await.unwrap().into_inner().value,
        b"x"
    );
}

#[tokio::test]
async fn a_pattern_crashing_mid_load_fails_calls_unavailable_then_serves_on_the_new_process() {
    // A crash leaves a window with no process (an operator restart does
    // not: it is blue/green, see reload.rs). A slow start keeps the
    // window wide, so calls surely meet it.
    let proxy = Proxy::builder()
        .chaos("mem", &["default"], "init_delay: 300ms")
        .start()
        .await;
    let channel = proxy.channel().await;
    let old_pid = proxy.pattern("mem").await.pid;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (stop, outcomes) = (stop.clone(), outcomes.clone());
        let mut kv = KeyValueClient::new(channel.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let mut req =
                    tonic::Request::new(put("default", &format!("w{worker}-{i}"), b"v".to_vec()));
                req.set_timeout(Duration::from_secs(5));
                let r = kv.put(req).await.map(|_| ());
                outcomes.lock().unwrap().push(r);
            }
        }));
    }
    let oks = |outcomes: &Arc<std::sync::Mutex<Vec<Result<(), tonic::Status>>>>| {
        outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.is_ok())
            .count()
    };
    eventually("calls succeed before the restart", || {
        let n = oks(&outcomes);
        async move { (n >= 20).then_some(()) }
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the pattern");
    let before = oks(&outcomes);
    eventually("calls succeed again after the restart", || {
        let n = oks(&outcomes);
        async move { (n >= before + 20).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_ne!(
        proxy.pattern("mem").await.pid,
        old_pid,
        "a new process serves"
    );
    let outcomes = outcomes.lock().unwrap();
    let errors: Vec<&tonic::Status> = outcomes.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!errors.is_empty(), "no call met the restart window");
    for e in &errors {
        assert_eq!(
            e.code(),
            Code::Unavailable,
            "every failure is UNAVAILABLE: {e:?}"
        );
        assert!(
            e.message().contains("\"mem\""),
            "names the pattern: {}",
            e.message()
        );
    }
    // The last calls all succeeded on the new process's connection.
    assert!(outcomes.iter().rev().take(10).all(|r| r.is_ok()));
    let _ = PATIENCE;
}

fn parse_grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("grpc-timeout {v:?}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("grpc-timeout {v:?}"),
    }
}

fn base64_value(json: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(json["value"].as_str().expect("value"))
        .expect("base64")
}

trait DecodeFramed {
    fn decode_framed(body: &[u8]) -> Vec<u8>;
}

impl DecodeFramed for trellis_proto::data::v1::GetResponse {
    /// The value of a framed `GetResponse`.
    fn decode_framed(body: &[u8]) -> Vec<u8> {
        use prost::Message;
        let msg = body.get(5..).expect("a framed message");
        Self::decode(msg).expect("GetResponse").value
    }
}
