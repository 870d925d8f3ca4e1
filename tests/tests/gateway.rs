//! The HTTP/JSON gateway end to end (issue 4): the real proxy, the real
//! memstore, plain HTTP requests.

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_types::StatusExt;
use trellis_proto::data::v1::GetRequest;
use trellis_tests::http::{get, put_json, send};
use trellis_tests::{PATIENCE, Proxy, eventually};

async fn proxy() -> (Proxy, String) {
    let p = Proxy::builder().memstore("mem", &["default"]).start().await;
    let base = p.http.clone().expect("the gateway is on");
    (p, base)
}

fn problem(r: &trellis_tests::http::Reply) -> serde_json::Value {
    assert_eq!(
        r.headers["content-type"],
        "application/problem+json",
        "{}",
        r.text()
    );
    r.json()
}

#[tokio::test]
async fn kv_over_http_with_a_slash_in_the_key() {
    let (_p, base) = proxy().await;
    let put = put_json(
        &format!("{base}/v1/namespaces/default/keys/a%2Fb"),
        r#"{"value":"aGk=","ttl":"30s"}"#,
    )
    .await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text());
    assert_eq!(put.json(), serde_json::json!({}));
    // %2F and / address the same key.
    for url in [
        "/v1/namespaces/default/keys/a%2Fb",
        "/v1/namespaces/default/keys/a/b",
    ] {
        let r = get(&format!("{base}{url}")).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.text());
        assert_eq!(r.json(), serde_json::json!({"value": "aGk="}));
        assert_eq!(r.headers["content-type"], "application/json");
    }
    let list = get(&format!(
        "{base}/v1/namespaces/default/keys?prefix=a%2F&pageSize=10"
    ))
    .await;
    assert_eq!(
        list.json(),
        serde_json::json!({"entries": [{"key": "a/b", "value": "aGk="}], "nextPageToken": ""})
    );
    let del = send(
        Method::DELETE,
        &format!("{base}/v1/namespaces/default/keys/a%2Fb"),
        &[],
        "",
        false,
    )
    .await;
    assert_eq!(del.json(), serde_json::json!({"deleted": true}));
    let again = send(
        Method::DELETE,
        &format!("{base}/v1/namespaces/default/keys/a%2Fb"),
        &[],
        "",
        false,
    )
    .await;
    assert_eq!(again.json(), serde_json::json!({"deleted": false}));
    let gone = get(&format!("{base}/v1/namespaces/default/keys/a/b")).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn h2c_works_too() {
    let (p, base) = proxy().await;
    let r = send(
        Method::GET,
        &format!("{base}/v1/namespaces/default/keys"),
        &[],
        "",
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["entries"], serde_json::json!([]));
    // The admin door speaks h2c too (and gRPC on the same port).
    let admin = p.admin.clone().unwrap();
    let r = send(Method::GET, &format!("{admin}/v1/patterns"), &[], "", true).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["patterns"][0]["name"], "mem");
}

#[tokio::test]
async fn admin_endpoints_answer_over_http_on_the_admin_door_only() {
    let (p, data) = proxy().await;
    // The data door does not serve (nor document) the admin routes.
    for (method, path) in [
        (Method::GET, "/v1/patterns"),
        (Method::POST, "/v1/patterns/mem:restart"),
        (Method::POST, "/v1/config:reload"),
        (Method::POST, "/v1/proxy:drain"),
    ] {
        let r = send(method.clone(), &format!("{data}{path}"), &[], "", false).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            r.text()
        );
        assert_eq!(problem(&r)["reason"], "ROUTE_NOT_FOUND");
    }
    let doc = get(&format!("{data}/openapi.json")).await.json();
    assert!(
        doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .all(|p| p.starts_with("/v1/namespaces/")),
        "the data door documents data routes only: {:?}",
        doc["paths"].as_object().unwrap().keys().collect::<Vec<_>>()
    );
    // Nor over gRPC: the Admin service is not there.
    let mut on_data = trellis_proto::admin::v1::admin_client::AdminClient::new(p.channel().await);
    let refused = on_data
        .list_patterns(trellis_proto::admin::v1::ListPatternsRequest {})
        .await
        .expect_err("no Admin on the data door");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    let base = p.admin.clone().expect("the admin door is on");
    let list = get(&format!("{base}/v1/patterns")).await.json();
    assert_eq!(list["patterns"][0]["state"], "PATTERN_STATE_SERVING");
    let one = get(&format!("{base}/v1/patterns/mem")).await.json();
    assert_eq!(one["namespaces"], serde_json::json!(["default"]));
    let pid = one["pid"].as_u64().unwrap();
    let restart = send(
        Method::POST,
        &format!("{base}/v1/patterns/mem:restart"),
        &[],
        "",
        false,
    )
    .await;
    assert_eq!(restart.status, StatusCode::OK, "{}", restart.text());
    let back = p
        .wait_pattern("mem", "restarted", |x| {
            x.pid != 0 && u64::from(x.pid) != pid && x.state == 2
        })
        .await;
    assert_eq!(back.restarts, 1);
    let missing = get(&format!("{base}/v1/patterns/nope")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(problem(&missing)["reason"], "PATTERN_NOT_FOUND");
}

#[tokio::test]
async fn errors_are_problem_json_with_the_request_id() {
    let (_p, base) = proxy().await;
    let r = send(
        Method::GET,
        &format!("{base}/v1/namespaces/default/keys/nope"),
        &[("x-request-id", "rid-42")],
        "",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.headers["x-request-id"], "rid-42");
    let doc = problem(&r);
    assert_eq!(doc["status"], 404);
    assert_eq!(doc["code"], "NOT_FOUND");
    assert_eq!(doc["instance"], "/v1/namespaces/default/keys/nope");
    assert_eq!(doc["request_id"], "rid-42");
    assert!(doc["title"].is_string() && doc["type"].is_string() && doc["detail"].is_string());

    let ns = get(&format!("{base}/v1/namespaces/nope/keys/k")).await;
    let doc = problem(&ns);
    assert_eq!(doc["reason"], "NAMESPACE_NOT_FOUND");
    assert!(doc["detail"].as_str().unwrap().contains("default"), "{doc}");
    assert_eq!(
        ns.headers["x-request-id"].len(),
        36,
        "generated when absent"
    );

    let traced = send(
        Method::GET,
        &format!("{base}/v1/namespaces/default/keys/nope"),
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
        "",
        false,
    )
    .await;
    assert_eq!(
        problem(&traced)["trace_id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[tokio::test]
async fn invalid_input_lists_every_violation() {
    let (_p, base) = proxy().await;
    let big = "A".repeat(1_500_000); // base64 of more than the 1 MiB value limit
    let r = put_json(
        &format!("{base}/v1/namespaces/default/keys/k"),
        &format!(r#"{{"value":"{big}","ttl":"-5s"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let doc = problem(&r);
    let fields: Vec<&str> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"value") && fields.contains(&"ttl"),
        "{doc}"
    );

    let unknown = put_json(
        &format!("{base}/v1/namespaces/default/keys/k"),
        r#"{"vaule":"aGk="}"#,
    )
    .await;
    let doc = problem(&unknown);
    assert_eq!(doc["reason"], "UNKNOWN_FIELD");
    assert_eq!(doc["errors"][0]["field"], "vaule");

    let malformed = put_json(
        &format!("{base}/v1/namespaces/default/keys/k"),
        "{\"value\": }",
    )
    .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert!(
        problem(&malformed)["detail"]
            .as_str()
            .unwrap()
            .contains("column"),
        "{}",
        malformed.text()
    );
}

#[tokio::test]
async fn protocol_errors_get_their_http_status() {
    let p = Proxy::builder()
        .top("http:\n  limits:\n    max_body: 1KiB\n    max_header_bytes: 2KiB\n    max_uri_bytes: 512\n    max_json_depth: 8")
        .memstore("mem", &["default"])
        .start()
        .await;
    let base = p.http.clone().unwrap();
    let key = format!("{base}/v1/namespaces/default/keys/k");

    let r = send(
        Method::PUT,
        &key,
        &[("content-type", "text/plain")],
        "hello",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", r.text());

    let r = send(Method::POST, &key, &[], "", false).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let allow = r.headers["allow"].to_str().unwrap();
    for m in ["GET", "PUT", "DELETE"] {
        assert!(allow.contains(m), "{allow}");
    }

    let r = get(&format!("{base}/v2/nothing")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(problem(&r)["reason"], "ROUTE_NOT_FOUND");

    let r = put_json(&key, &format!(r#"{{"value":"{}"}}"#, "A".repeat(2048))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());

    let long = "x".repeat(1024);
    let r = send(
        Method::GET,
        &key,
        &[("x-filler", long.as_str()), ("x-filler-2", long.as_str())],
        "",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    let r = get(&format!(
        "{base}/v1/namespaces/default/keys/{}",
        "k".repeat(600)
    ))
    .await;
    assert_eq!(r.status, StatusCode::URI_TOO_LONG);

    let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
    let r = put_json(&key, &format!(r#"{{"value":{deep}}}"#)).await;
    assert_eq!(problem(&r)["reason"], "JSON_TOO_DEEP");

    for bad in [
        "/v1/namespaces/default/keys/a/../b",
        "/v1/namespaces/default/keys/%2e%2e",
        "/v1/namespaces/default/keys/a%00b",
        "/v1/namespaces/default/keys/%FF",
    ] {
        let r = get(&format!("{base}{bad}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text());
    }
}

#[tokio::test]
async fn an_unavailable_pattern_is_503_with_retry_after_and_retry_info() {
    let (p, base) = proxy().await;
    p.admin()
        .await
        .stop_pattern(trellis_proto::admin::v1::PatternActionRequest { name: "mem".into() })
        .await
        .unwrap();
    let r = get(&format!("{base}/v1/namespaces/default/keys/k")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(problem(&r)["reason"], "PATTERN_UNAVAILABLE");

    // The same error over gRPC carries ErrorInfo and RetryInfo.
    let s = p
        .kv()
        .await
        .get(GetRequest {
            namespace: "default".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "PATTERN_UNAVAILABLE"
    );
    assert!(s.get_details_retry_info().is_some());
    let s = p
        .kv()
        .await
        .get(GetRequest {
            namespace: "nope".into(),
            key: "k".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        s.get_details_error_info().unwrap().reason,
        "NAMESPACE_NOT_FOUND"
    );
}

#[tokio::test]
async fn the_request_id_reaches_the_pattern_and_authorization_is_never_logged() {
    let p = Proxy::builder().chaos("chaos", &["c"], "").start().await;
    let base = p.http.clone().unwrap();
    let r = send(
        Method::GET,
        &format!("{base}/v1/namespaces/c/keys/k"),
        &[
            ("x-request-id", "trace-me-7"),
            ("authorization", "Bearer supersecret-token"),
        ],
        "",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    eventually("the pattern logs the request id", || async {
        p.log_text()
            .lines()
            .any(|l| l.contains("chaos get") && l.contains("trace-me-7"))
            .then_some(())
    })
    .await;
    assert!(
        !p.log_text().contains("supersecret"),
        "the token leaked into the log"
    );
}

#[tokio::test]
async fn server_streams_are_ndjson_or_sse() {
    let (p, _) = proxy().await;
    let base = p.admin.clone().unwrap();
    let url = format!("{base}/v1/patterns:watch");
    for (accept, want_ct, prefix) in [
        ("application/json", "application/x-ndjson", "{\"result\":"),
        ("text/event-stream", "text/event-stream", "data: "),
    ] {
        let addr = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req =
            format!("GET /v1/patterns:watch HTTP/1.1\r\nhost: {addr}\r\naccept: {accept}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "stream closed early: {}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if text.contains("PATTERN_STATE_SERVING") {
                    return text.to_string();
                }
            }
        };
        let text = tokio::time::timeout(PATIENCE, read)
            .await
            .expect("first event");
        assert!(text.contains(&format!("content-type: {want_ct}")), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        // Chunked: skip the chunk-size line.
        let first = body.lines().nth(1).unwrap();
        assert!(first.starts_with(prefix), "{accept}: {first}");
    }
}

#[tokio::test]
async fn openapi_and_reflection_describe_the_api() {
    let (p, base) = proxy().await;
    let doc = get(&format!("{base}/openapi.json")).await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/namespaces/{namespace}/keys/{key}"]["put"].is_object());

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(p.admin_channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["trellis.data.v1.KeyValue", "trellis.admin.v1.Admin"] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let p = Proxy::builder()
        .top("http:\n  limits:\n    read_timeout: 300ms")
        .memstore("mem", &["default"])
        .start()
        .await;
    let addr = p
        .http
        .clone()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();

    // Slow-loris: headers that never finish. The server closes the connection.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /v1/patterns HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf))
        .await
        .expect("the server hangs up");
    assert!(closed.is_ok());
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // A body that never finishes: 408 problem+json.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"PUT /v1/namespaces/default/keys/k HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"va").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
}

#[tokio::test]
async fn subscribe_over_http_streams_published_messages() {
    let (_p, base) = proxy().await;
    let addr = base.trim_start_matches("http://").to_string();
    let mut sub = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "GET /v1/namespaces/default/topics/news:subscribe HTTP/1.1\r\nhost: {addr}\r\n\r\n"
    );
    sub.write_all(req.as_bytes()).await.unwrap();
    // The subscription is live once a probe published after it arrives;
    // publish probes until one does (no fixed sleep).
    let mut seen = String::new();
    let got = async {
        let mut chunk = [0u8; 8192];
        loop {
            let r = put_publish(&base, "cHJvYmU=").await; // "probe"
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            assert!(
                r.json()["messageId"]
                    .as_str()
                    .is_some_and(|id| !id.is_empty()),
                "{}",
                r.text()
            );
            if let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_millis(50), sub.read(&mut chunk))
                    .await
            {
                assert!(n > 0, "stream closed: {seen}");
                seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
                if seen.contains("cHJvYmU=") {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(PATIENCE, got)
        .await
        .expect("a probe arrives");
    assert!(seen.contains("application/x-ndjson"), "{seen}");
    assert!(seen.contains("{\"result\":{"), "{seen}");
}

async fn put_publish(base: &str, payload_b64: &str) -> trellis_tests::http::Reply {
    send(
        Method::POST,
        &format!("{base}/v1/namespaces/default/topics/news:publish"),
        &[("content-type", "application/json")],
        &format!(r#"{{"payload":"{payload_b64}","attributes":{{"k":"v"}}}}"#),
        false,
    )
    .await
}

/// One raw HTTP/1.1 exchange on a fresh connection: writes `head` and then
/// all of `body` **before reading anything** (as Python's `urllib` does),
/// then reads until the server closes. Returns the status line's code, the
/// head (lower-cased) and the body of the answer.
async fn write_all_then_read(addr: &str, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let exchange = async {
        s.write_all(head.as_bytes()).await.expect("headers sent");
        s.write_all(body)
            .await
            .expect("the whole body is written without a reset (the proxy reads it)");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .await
            .expect("the answer is read without a reset");
        answer
    };
    let answer = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("an answer, then the connection closed");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {}", String::from_utf8_lossy(&answer)));
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head}"));
    (status, head, answer[split + 4..].to_vec())
}

fn assert_body_too_large(status: u16, head: &str, body: &[u8]) {
    assert_eq!(status, 413, "{head}\n{}", String::from_utf8_lossy(body));
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    let doc: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
    assert_eq!(doc["reason"], "BODY_TOO_LARGE", "{doc}");
    assert!(
        doc["detail"]
            .as_str()
            .is_some_and(|d| d.contains("http.limits.max_body")),
        "{doc}"
    );
}

#[tokio::test]
async fn a_client_that_writes_a_too_large_body_before_reading_gets_its_413() {
    let (_p, base) = proxy().await; // default max_body: 4 MiB
    let addr = base.trim_start_matches("http://").to_string();
    let big = vec![b'x'; 16 << 20];

    // Declared too large by Content-Length.
    let head = format!(
        "PUT /v1/namespaces/default/keys/k HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    let (status, head, body) = write_all_then_read(&addr, &head, &big).await;
    assert_body_too_large(status, &head, &body);

    // Chunked: too large is only found out while reading.
    let mut chunked = Vec::with_capacity(big.len() + 8192);
    for piece in big.chunks(64 << 10) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = format!(
        "PUT /v1/namespaces/default/keys/k HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let (status, head, body) = write_all_then_read(&addr, &head, &chunked).await;
    assert_body_too_large(status, &head, &body);

    // h2c: answered early, the stream ended with RST_STREAM(NO_ERROR).
    let text = String::from_utf8(big).unwrap();
    let r = send(
        Method::PUT,
        &format!("{base}/v1/namespaces/default/keys/k"),
        &[("content-type", "application/json")],
        &text,
        true,
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_eq!(problem(&r)["reason"], "BODY_TOO_LARGE");
}

#[tokio::test]
async fn a_declared_too_large_body_that_will_not_be_read_is_refused_at_once() {
    // A read_timeout far beyond PATIENCE: if the gateway waited for these
    // bodies, the test would time out instead of passing.
    let p = Proxy::builder()
        .top("http:\n  limits:\n    read_timeout: 1h")
        .memstore("mem", &["default"])
        .start()
        .await;
    let addr = p
        .http
        .clone()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    for (extra, length) in [
        // The client waits for a go-ahead before sending the body.
        ("expect: 100-continue\r\n", 16u64 << 20),
        // More than http.limits.max_discard (64 MiB): not worth reading.
        ("", 1 << 30),
    ] {
        let head = format!(
            "PUT /v1/namespaces/default/keys/k HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n{extra}content-length: {length}\r\n\r\n"
        );
        let (status, head, body) = write_all_then_read(&addr, &head, b"").await;
        assert!(!head.contains("100 continue"), "{head}");
        assert_body_too_large(status, &head, &body);
    }
}
