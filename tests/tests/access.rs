//! Caller identity and per-namespace access (issue 16, part 3), against
//! the real binary: bearer tokens (by hash and from a file) and client
//! certificate names, roles per namespace on both data doors, the admin
//! role on the admin door, the probes left open, per-caller rate limits
//! keyed by identity, and no token in any log line or answer.

use std::path::Path;

use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use trellis_proto::admin::v1 as admin;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_tests::http::send;
use trellis_tests::kv::{get, put};
use trellis_tests::pki::{Ca, Leaf};
use trellis_tests::{Proxy, eventually};

const TOKEN_A: &str = "tok-a-7f3c9e1d5b2a4c6e8f0a1b3c";
const TOKEN_R: &str = "tok-r-2b4d6f8a0c1e3a5c7e9b1d3f";
const TOKEN_OPS: &str = "tok-ops-9e8d7c6b5a4f3e2d1c0b";

fn sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// app-a reads and writes `a`; app-r (its token in a file) reads all;
/// ops administers; app-c (certificate only) reads and writes `a`.
fn access_yaml(token_file: &Path) -> String {
    format!(
        "identities:\n\
         \x20 - name: app-a\n    token_sha256: \"{}\"\n\
         \x20 - name: app-r\n    token_file: {token_file:?}\n\
         \x20 - name: ops\n    token_sha256: \"{}\"\n\
         \x20 - name: app-c\n\
         access:\n\
         \x20 - identity: app-a\n    namespaces: [\"a\"]\n    roles: [read, write]\n\
         \x20 - identity: app-r\n    namespaces: [\"*\"]\n    roles: [read]\n\
         \x20 - identity: ops\n    namespaces: [\"*\"]\n    roles: [admin]\n\
         \x20 - identity: app-c\n    namespaces: [\"a\"]\n    roles: [read, write]\n",
        sha256(TOKEN_A),
        sha256(TOKEN_OPS)
    )
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn reason(s: &Status) -> String {
    use tonic_types::StatusExt;
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// Asserts a refusal's code, and that its message names each of `names`.
fn refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, names: &[&str]) {
    let s = r.expect_err("refused");
    assert_eq!(s.code(), code, "{s:?}");
    for n in names {
        assert!(s.message().contains(n), "{n} not in {:?}", s.message());
    }
    for t in [TOKEN_A, TOKEN_R, TOKEN_OPS] {
        assert!(!s.message().contains(t), "a token in {:?}", s.message());
    }
}

#[tokio::test]
async fn tokens_get_their_roles_per_namespace_on_every_door() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("app-r.token");
    std::fs::write(&token_file, format!("{TOKEN_R}\n")).unwrap();
    let proxy = Proxy::builder()
        .top(&access_yaml(&token_file))
        .memstore("mem", &["a", "b"])
        // Health needs no credentials: `start` waits on it.
        .start()
        .await;
    let mut kv = proxy.kv().await;

    // app-a reads and writes `a`, and is refused `b`.
    kv.put(bearer(put("a", "k", b"v"), TOKEN_A))
        .await
        .expect("app-a writes a");
    let v = kv
        .get(bearer(get("a", "k"), TOKEN_A))
        .await
        .expect("app-a reads a");
    assert_eq!(v.into_inner().value, b"v");
    refused(
        kv.get(bearer(get("b", "k"), TOKEN_A)).await,
        Code::PermissionDenied,
        &["app-a", "\"b\"", "read"],
    );
    // A read-only identity (token from a file) reads, never writes.
    kv.get(bearer(get("a", "k"), TOKEN_R))
        .await
        .expect("app-r reads a");
    refused(
        kv.put(bearer(put("a", "k", b"w"), TOKEN_R)).await,
        Code::PermissionDenied,
        &["app-r", "\"a\"", "write"],
    );
    // No credentials, a wrong token, another scheme.
    let none = kv.get(get("a", "k")).await;
    assert_eq!(reason(none.as_ref().unwrap_err()), "CREDENTIALS_MISSING");
    refused(none, Code::Unauthenticated, &[]);
    refused(
        kv.get(bearer(get("a", "k"), "not-a-token")).await,
        Code::Unauthenticated,
        &[],
    );
    // Not even an unknown namespace is revealed to a caller without a role.
    refused(
        kv.get(bearer(get("nope", "k"), TOKEN_A)).await,
        Code::PermissionDenied,
        &["\"nope\""],
    );

    // The same over HTTP.
    let base = proxy.http.clone().unwrap();
    let url = |ns: &str| format!("{base}/v1/namespaces/{ns}/keys/k");
    let auth = |t: &str| format!("Bearer {t}");
    let a = auth(TOKEN_A);
    let r = send(Method::GET, &url("a"), &[("authorization", &a)], "", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(Method::GET, &url("b"), &[("authorization", &a)], "", false).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.json()["reason"], "ROLE_MISSING");
    let put_body = r#"{"value":"aGk="}"#;
    let rd = auth(TOKEN_R);
    let json = ("content-type", "application/json");
    let r = send(
        Method::PUT,
        &url("a"),
        &[("authorization", &rd), json],
        put_body,
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let r = send(
        Method::PUT,
        &url("a"),
        &[("authorization", &a), json],
        put_body,
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for headers in [vec![], vec![("authorization", "Bearer wrong")]] {
        let r = send(Method::GET, &url("a"), &headers, "", false).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
        assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"trellis\"");
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    // Probes, metrics and the API document stay open.
    for path in ["/readyz", "/livez", "/metrics", "/openapi.json"] {
        let r = send(Method::GET, &format!("{base}{path}"), &[], "", false).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    }

    // The admin door: the admin role, over gRPC and HTTP.
    let mut adm = proxy.admin().await;
    refused(
        adm.list_patterns(admin::ListPatternsRequest {}).await,
        Code::Unauthenticated,
        &[],
    );
    refused(
        adm.list_patterns(bearer(admin::ListPatternsRequest {}, TOKEN_A))
            .await,
        Code::PermissionDenied,
        &["app-a", "admin"],
    );
    let listed = adm
        .list_patterns(bearer(admin::ListPatternsRequest {}, TOKEN_OPS))
        .await
        .expect("ops lists patterns")
        .into_inner();
    assert_eq!(listed.patterns[0].name, "mem");
    let admin_base = proxy.admin.clone().unwrap();
    let patterns = format!("{admin_base}/v1/patterns");
    let r = send(Method::GET, &patterns, &[], "", false).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"trellis\"");
    let r = send(Method::GET, &patterns, &[("authorization", &a)], "", false).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let ops = auth(TOKEN_OPS);
    let r = send(
        Method::GET,
        &patterns,
        &[("authorization", &ops)],
        "",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let answer = r.text();
    for path in ["/readyz", "/metrics"] {
        let r = send(Method::GET, &format!("{admin_base}{path}"), &[], "", false).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
    }
    let metrics = send(Method::GET, &format!("{base}/metrics"), &[], "", false)
        .await
        .text();

    // No token (nor its hash) anywhere it could leak.
    let log = proxy.log_text();
    assert!(log.contains("access control is on"), "{log}");
    for t in [TOKEN_A, TOKEN_R, TOKEN_OPS] {
        for (what, text) in [
            ("log", &log),
            ("admin answer", &answer),
            ("metrics", &metrics),
        ] {
            assert!(!text.contains(t), "a token in the {what}");
            assert!(!text.contains(&sha256(t)), "a token's hash in the {what}");
        }
    }
}

/// A gRPC channel over TLS, trusting `ca`, presenting `identity`.
async fn tls_channel(url: &str, ca: &Ca, identity: &Leaf) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(&identity.cert, &identity.key));
    Endpoint::from_shared(url.replace("http://", "https://"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect")
}

#[tokio::test]
async fn a_client_certificate_names_the_identity_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("app-r.token");
    std::fs::write(&token_file, TOKEN_R).unwrap();
    let ca = Ca::new("trellis test CA");
    ca.server().write(dir.path(), "server");
    let clients = Ca::new("client CA");
    let client_ca = clients.write(dir.path(), "clients.crt");
    let tls = format!(
        "tls:\n  cert_file: {:?}\n  key_file: {:?}\n  client_ca_file: {client_ca:?}\n",
        dir.path().join("server.crt"),
        dir.path().join("server.key"),
    );
    let proxy = Proxy::builder()
        .top(&tls)
        .top(&access_yaml(&token_file))
        .memstore("mem", &["a", "b"])
        .spawn()
        .await;
    let app_c = clients.client("app-c");
    let channel = tls_channel(&proxy.addr, &ca, &app_c).await;
    let mut kv = KeyValueClient::new(channel);
    // Waits for the pattern: app-c's own calls are the probe.
    eventually("app-c's put to be served", || {
        let mut kv = kv.clone();
        async move { kv.put(put("a", "k", b"c")).await.ok() }
    })
    .await;
    let v = kv.get(get("a", "k")).await.expect("app-c reads a");
    assert_eq!(v.into_inner().value, b"c");
    refused(
        kv.get(get("b", "k")).await,
        Code::PermissionDenied,
        &["app-c", "\"b\""],
    );
    // A token sent on the same connection is the identity that counts.
    refused(
        kv.put(bearer(put("a", "k", b"r"), TOKEN_R)).await,
        Code::PermissionDenied,
        &["app-r", "write"],
    );
    // A certificate the CA signed for a name with no grant: no role.
    let stranger = clients.client("someone-else");
    let mut kv = KeyValueClient::new(tls_channel(&proxy.addr, &ca, &stranger).await);
    refused(
        kv.get(get("a", "k")).await,
        Code::PermissionDenied,
        &["someone-else"],
    );
    // The admin door (served by the HTTP listener code, gRPC by its
    // content type): app-c has no admin role; the certificate reached it.
    let channel = tls_channel(proxy.admin.as_deref().unwrap(), &ca, &app_c).await;
    refused(
        admin::admin_client::AdminClient::new(channel)
            .list_patterns(admin::ListPatternsRequest {})
            .await,
        Code::PermissionDenied,
        &["app-c", "admin"],
    );
}

#[tokio::test]
async fn a_per_caller_rate_limit_gives_each_identity_its_own_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("app-r.token");
    std::fs::write(&token_file, TOKEN_R).unwrap();
    let proxy = Proxy::builder()
        .top(&access_yaml(&token_file))
        .top(
            "policies:\n  limited:\n    retries: { max_attempts: 1 }\n    \
             circuit_breaker: { enabled: false }\n    \
             rate_limit: { per_second: 1, burst: 3, per_caller: true }",
        )
        .memstore("mem", &["a"])
        .policy("a", "limited")
        .start()
        .await;
    let mut kv = proxy.kv().await;
    // Both send the same x-client-id: the identity is what counts.
    let as_caller = |token: &str| {
        let mut req = bearer(get("a", "k"), token);
        req.metadata_mut()
            .insert("x-client-id", "shared".parse().unwrap());
        req
    };
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(kv.get(as_caller(TOKEN_A)).await);
    }
    // NOT_FOUND (no such key) is served; only the fourth is limited.
    for r in &outcomes[..3] {
        assert!(matches!(r, Err(s) if s.code() == Code::NotFound), "{r:?}");
    }
    let limited = outcomes[3].as_ref().unwrap_err();
    assert_eq!(reason(limited), "RATE_LIMITED", "{limited:?}");
    assert!(limited.message().contains("app-a"), "{limited:?}");
    for _ in 0..3 {
        let r = kv.get(as_caller(TOKEN_R)).await;
        assert!(
            matches!(&r, Err(s) if s.code() == Code::NotFound),
            "app-r has a bucket of its own: {r:?}"
        );
    }
}

/// An idempotency key is its caller's own: another identity that sends the
/// same key (even with the same request) is refused as a reuse, and never
/// gets the first caller's stored answer; the first caller's retry is a
/// replay.
#[tokio::test]
async fn an_idempotency_key_is_scoped_to_its_identity() {
    const W1: &str = "tok-w1-0a1b2c3d4e5f60718293a4b5";
    const W2: &str = "tok-w2-5b4a39281706f5e4d3c2b1a0";
    let yaml = format!(
        "identities:\n\
         \x20 - name: w1\n    token_sha256: \"{}\"\n\
         \x20 - name: w2\n    token_sha256: \"{}\"\n\
         access:\n\
         \x20 - identity: w1\n    namespaces: [\"a\"]\n    roles: [read, write]\n\
         \x20 - identity: w2\n    namespaces: [\"a\"]\n    roles: [read, write]\n",
        sha256(W1),
        sha256(W2)
    );
    let proxy = Proxy::builder()
        .top(&yaml)
        .memstore("mem", &["a"])
        .start()
        .await;
    let mut kv = proxy.kv().await;
    let keyed = |token: &str| {
        let mut req = bearer(put("a", "k", b"v"), token);
        req.metadata_mut()
            .insert("idempotency-key", "key-1".parse().unwrap());
        req
    };
    let first = kv.put(keyed(W1)).await.expect("w1's keyed write");
    assert!(!trellis_tests::kv::idempotent_replayed(&first));
    let again = kv.put(keyed(W1)).await.expect("w1's retry");
    assert!(
        trellis_tests::kv::idempotent_replayed(&again),
        "w1's retry is a replay"
    );
    let other = kv.put(keyed(W2)).await;
    let s = other.expect_err("w2 reusing w1's key is refused");
    assert_eq!(reason(&s), "IDEMPOTENCY_KEY_REUSED", "{s:?}");
}

/// A single-port setup: `listen.admin_on_data_doors` serves the admin API
/// on the data doors too, to the admin role only; without an `access:`
/// section granting that role the configuration is refused.
#[tokio::test]
async fn admin_on_the_data_doors_only_for_the_admin_role_and_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("app-r.token");
    std::fs::write(&token_file, format!("{TOKEN_R}\n")).unwrap();
    let proxy = Proxy::builder()
        .top(&access_yaml(&token_file))
        .env("TRELLIS_LISTEN__ADMIN_ON_DATA_DOORS", "true")
        .memstore("mem", &["a"])
        .start()
        .await;
    let mut on_data = admin::admin_client::AdminClient::new(proxy.channel().await);
    let list = || admin::ListPatternsRequest {};
    let patterns = on_data
        .list_patterns(bearer(list(), TOKEN_OPS))
        .await
        .expect("the admin role, on the data door")
        .into_inner();
    assert_eq!(patterns.patterns[0].name, "mem");
    refused(
        on_data.list_patterns(Request::new(list())).await,
        Code::Unauthenticated,
        &[],
    );
    refused(
        on_data.list_patterns(bearer(list(), TOKEN_A)).await,
        Code::PermissionDenied,
        &["app-a", "admin"],
    );
    // And over HTTP on the data door.
    let base = proxy.http.clone().unwrap();
    let auth = format!("Bearer {TOKEN_OPS}");
    let r = send(
        Method::GET,
        &format!("{base}/v1/patterns"),
        &[("authorization", auth.as_str())],
        "",
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(Method::GET, &format!("{base}/v1/patterns"), &[], "", false).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());

    // Without access: the option is refused, naming the field.
    let config = dir.path().join("single-port.yaml");
    std::fs::write(
        &config,
        "listen: {grpc: \"127.0.0.1:0\", admin_on_data_doors: true}\npatterns: []\n",
    )
    .unwrap();
    let out = std::process::Command::new(trellis_tests::bin("trellis"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("listen.admin_on_data_doors") && err.contains("admin"),
        "{err}"
    );
}
