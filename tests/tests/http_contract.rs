//! What `/openapi.json` promises, checked directly against the real proxy
//! (issue 15; tests/tests/schemathesis.rs checks it by generation): `405`
//! with the exact `Allow`, the TTL format the document publishes, and a
//! storm of pattern restarts over HTTP.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use trellis_proto::admin::v1 as admin;
use trellis_tests::Proxy;
use trellis_tests::http::{Reply, get, put_json, send};

async fn proxy() -> (Proxy, String) {
    let p = Proxy::builder().memstore("mem", &["default"]).start().await;
    let base = p.http.clone().expect("the gateway is on");
    (p, base)
}

/// The admin door's base URL.
fn admin(p: &Proxy) -> String {
    p.admin.clone().expect("the admin door is on")
}

fn problem(r: &Reply) -> serde_json::Value {
    assert_eq!(
        r.headers["content-type"],
        "application/problem+json",
        "{}",
        r.text()
    );
    r.json()
}

/// The methods the document lists for `path` (an OpenAPI path).
fn documented(doc: &serde_json::Value, path: &str) -> Vec<String> {
    let mut methods: Vec<String> = doc["paths"][path]
        .as_object()
        .unwrap_or_else(|| panic!("{path} is not in the document"))
        .keys()
        .map(|m| m.to_ascii_uppercase())
        .collect();
    methods.sort();
    methods
}

#[tokio::test]
async fn an_undeclared_method_is_405_with_exactly_the_documented_methods_in_allow() {
    let (p, data) = proxy().await;
    let admin = admin(&p);
    // Paths that share a prefix with another route: a verb after a name
    // (`{name}` alone would take `mem:restart`), a collection beside its
    // items (`{key=**}` would take an empty key), a verb after a topic.
    // Each on its door, held to that door's document.
    for (base, method, path, openapi_path) in [
        (
            &admin,
            Method::OPTIONS,
            "/v1/patterns/mem:restart",
            "/v1/patterns/{name}:restart",
        ),
        (
            &admin,
            Method::GET,
            "/v1/patterns/mem:start",
            "/v1/patterns/{name}:start",
        ),
        (
            &admin,
            Method::DELETE,
            "/v1/patterns/mem:stop",
            "/v1/patterns/{name}:stop",
        ),
        (
            &data,
            Method::PUT,
            "/v1/namespaces/default/keys",
            "/v1/namespaces/{namespace}/keys",
        ),
        (
            &data,
            Method::POST,
            "/v1/namespaces/default/keys/k",
            "/v1/namespaces/{namespace}/keys/{key}",
        ),
        (
            &data,
            Method::PUT,
            "/v1/namespaces/default/topics/t:publish",
            "/v1/namespaces/{namespace}/topics/{topic}:publish",
        ),
        (&admin, Method::DELETE, "/v1/patterns", "/v1/patterns"),
        (
            &admin,
            Method::PATCH,
            "/v1/patterns/mem",
            "/v1/patterns/{name}",
        ),
    ] {
        let r = send(method.clone(), &format!("{base}{path}"), &[], "", false).await;
        let doc = get(&format!("{base}/openapi.json")).await.json();
        assert_eq!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            r.text()
        );
        assert_eq!(problem(&r)["reason"], "METHOD_NOT_ALLOWED");
        let mut allow: Vec<String> = r.headers["allow"]
            .to_str()
            .unwrap()
            .split(", ")
            .map(str::to_string)
            .collect();
        allow.sort();
        assert_eq!(allow, documented(&doc, openapi_path), "{method} {path}");
    }
    // A pattern name that merely contains a verb's letters is a name.
    let r = get(&format!("{admin}/v1/patterns/mem:restarts")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    assert_eq!(problem(&r)["reason"], "PATTERN_NOT_FOUND");
}

#[tokio::test]
async fn the_ttl_format_the_document_publishes_is_exactly_what_a_put_accepts() {
    let (_p, base) = proxy().await;
    let doc = get(&format!("{base}/openapi.json")).await.json();
    let ttl = &doc["paths"]["/v1/namespaces/{namespace}/keys/{key}"]["put"]["requestBody"]["content"]
        ["application/json"]["schema"]["properties"]["ttl"];
    let pattern = regex::Regex::new(ttl["pattern"].as_str().expect("ttl has a pattern"))
        .expect("the ttl pattern compiles");
    let url = format!("{base}/v1/namespaces/default/keys/ttl");
    for value in [
        "30s",
        "1.5s",
        "0s",
        "0.000000001s",
        "315576000000s",
        "30",
        "30m",
        "1h",
        "-1s",
        "-0.5s",
        "1.s",
        "315576000001s",
        "PT30S",
        "",
    ] {
        let r = put_json(&url, &format!(r#"{{"value":"aGk=","ttl":"{value}"}}"#)).await;
        let documented = pattern.is_match(value);
        assert_eq!(
            r.status == StatusCode::OK,
            documented,
            "ttl {value:?}: the document says {}, the server answered {} {}",
            if documented { "valid" } else { "invalid" },
            r.status,
            r.text()
        );
        if !documented {
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{value:?}");
            let p = problem(&r);
            assert!(
                p["detail"].as_str().unwrap_or("").contains("ttl")
                    || p["errors"][0]["field"] == "ttl",
                "the error names the field: {p}"
            );
        }
    }
    // A Duration is a JSON string: a number is refused too.
    let r = put_json(&url, r#"{"value":"aGk=","ttl":30}"#).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

/// The failure Schemathesis once found: a restart that arrived while the
/// pattern was starting waited out `stop_grace`. Here `stop_grace` is far
/// above anything the storm needs, so a call that waited it out shows.
#[tokio::test]
async fn a_storm_of_restarts_stops_and_starts_over_http_answers_every_call_and_leaves_one_process()
{
    const STOP_GRACE: Duration = Duration::from_secs(30);
    let proxy = Proxy::builder()
        .memstore("mem", &["default"])
        .with("stop_grace: 30s")
        .start()
        .await;
    let base = admin(&proxy);
    let actions = ["restart", "stop", "start", "restart", "start", "restart"];
    let calls = (0..5).flat_map(|_| actions).map(|action| {
        let url = format!("{base}/v1/patterns/mem:{action}");
        async move {
            let started = Instant::now();
            let r = send(Method::POST, &url, &[], "", false).await;
            (action, r, started.elapsed())
        }
    });
    for (action, r, took) in futures::future::join_all(calls).await {
        assert!(
            took < STOP_GRACE,
            "{action} took {took:?}: it waited out stop_grace"
        );
        match r.status {
            StatusCode::OK => {
                assert_eq!(r.json()["pattern"]["name"], "mem", "{}", r.text());
            }
            // Starting what runs: the documented conflict.
            StatusCode::CONFLICT if action == "start" => {
                assert_eq!(problem(&r)["reason"], "ALREADY_RUNNING")
            }
            // A blue/green restart whose new process never served.
            StatusCode::SERVICE_UNAVAILABLE if action == "restart" => {
                assert_eq!(problem(&r)["reason"], "NOT_REPLACED")
            }
            other => panic!("{action}: {other} {}", r.text()),
        }
    }
    // Whatever order they ran in, one start brings it back, and exactly one
    // pattern process is left.
    let r = send(
        Method::POST,
        &format!("{base}/v1/patterns/mem:start"),
        &[],
        "",
        false,
    )
    .await;
    assert!(
        r.status == StatusCode::OK || r.status == StatusCode::CONFLICT,
        "{}",
        r.text()
    );
    let serving = proxy
        .wait_pattern("mem", "mem to serve after the storm", |p| {
            p.state() == admin::PatternState::Serving
        })
        .await;
    assert_eq!(
        proxy.children(),
        vec![serving.pid],
        "one pattern process, and it is the one serving"
    );
    let data = proxy.http.clone().expect("the gateway is on");
    let r = put_json(
        &format!("{data}/v1/namespaces/default/keys/after"),
        r#"{"value":"aGk="}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}
