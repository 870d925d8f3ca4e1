//! TLS on the proxy's doors (issue 16), against the real binary with
//! certificates made by the test: plaintext refused, a client trusting the
//! CA served on every door, mutual TLS, and a certificate rotation without
//! a restart.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use trellis_proto::admin::v1 as admin;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{PublishRequest, SubscribeRequest};
use trellis_tests::http::https_get;
use trellis_tests::kv::{get, put};
use trellis_tests::pki::{Ca, Leaf};
use trellis_tests::{Proxy, eventually};

/// The proxy with TLS from `dir/server.{crt,key}`, and mTLS against
/// `client_ca` when given.
async fn proxy(dir: &Path, client_ca: Option<&Path>) -> Proxy {
    let mut tls = format!(
        "tls:\n  cert_file: {:?}\n  key_file: {:?}\n",
        dir.join("server.crt"),
        dir.join("server.key")
    );
    if let Some(ca) = client_ca {
        tls.push_str(&format!("  client_ca_file: {ca:?}\n"));
    }
    Proxy::builder()
        .top(&tls)
        .memstore("mem", &["default"])
        .spawn()
        .await
}

/// Waits until health `""` is SERVING, asked over TLS.
async fn wait_ready(proxy: &Proxy, ca: &Ca, identity: Option<&Leaf>) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    eventually("the proxy to be ready (over TLS)", || async {
        let channel = tls_channel(&proxy.addr, ca, identity).await.ok()?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest { service: "".into() })
            .await
            .ok()?
            .into_inner()
            .status();
        (status == ServingStatus::Serving).then_some(())
    })
    .await;
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// A gRPC channel over TLS to `url`'s address, trusting `ca`, presenting
/// `identity` when given.
async fn tls_channel(url: &str, ca: &Ca, identity: Option<&Leaf>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Endpoint::from_shared(format!("https://{}", host_port(url)))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn kv_works(channel: Channel) -> Result<(), String> {
    let mut kv = KeyValueClient::new(channel);
    kv.put(put("default", "k", b"v"))
        .await
        .map_err(|s| s.to_string())?;
    let v = kv
        .get(get("default", "k"))
        .await
        .map_err(|s| s.to_string())?;
    (v.into_inner().value == b"v")
        .then_some(())
        .ok_or("wrong value".into())
}

#[tokio::test]
async fn every_door_speaks_tls_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("trellis test CA");
    ca.server().write(dir.path(), "server");
    let proxy = proxy(dir.path(), None).await;
    wait_ready(&proxy, &ca, None).await;

    // gRPC: a client trusting the CA is served; plaintext is not.
    let channel = tls_channel(&proxy.addr, &ca, None)
        .await
        .expect("TLS to the gRPC door");
    kv_works(channel).await.expect("a call over TLS");
    let plain = Endpoint::from_shared(proxy.addr.clone())
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => KeyValueClient::new(ch)
            .get(get("default", "k"))
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext gRPC call was served");
    // A client that trusts another CA is refused by its own check.
    let other = Ca::new("another CA");
    assert!(tls_channel(&proxy.addr, &other, None).await.is_err());

    // HTTP and the admin door: TLS with ALPN; plaintext gets no answer.
    for door in [proxy.http.clone().unwrap(), proxy.admin.clone().unwrap()] {
        let r = https_get(&host_port(&door), &ca.pem, "/readyz")
            .await
            .unwrap_or_else(|e| panic!("{door}: {e}"));
        assert_eq!(r.status, http::StatusCode::OK, "{door}: {}", r.text());
        let plain =
            tokio::time::timeout(trellis_tests::PATIENCE, plain_http_get(&host_port(&door)))
                .await
                .expect("the plaintext request ends");
        assert!(plain.is_err(), "{door} answered plaintext: {plain:?}");
    }
    // The admin API over TLS, gRPC on the admin door.
    let admin_channel = tls_channel(proxy.admin.as_deref().unwrap(), &ca, None)
        .await
        .expect("TLS to the admin door");
    let patterns = admin::admin_client::AdminClient::new(admin_channel)
        .list_patterns(admin::ListPatternsRequest {})
        .await
        .expect("admin over TLS")
        .into_inner();
    assert_eq!(patterns.patterns[0].name, "mem");
}

/// A plaintext HTTP/1.1 GET /readyz; `Err` when no HTTP answer comes.
async fn plain_http_get(addr: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    if text.starts_with("HTTP/1.1") {
        Ok(text)
    } else {
        Err(format!("no HTTP answer: {text:?}"))
    }
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("trellis test CA");
    ca.server().write(dir.path(), "server");
    let clients = Ca::new("client CA");
    let client_ca = clients.write(dir.path(), "clients.crt");
    let proxy = proxy(dir.path(), Some(&client_ca)).await;
    let good = clients.client("app-a");
    wait_ready(&proxy, &ca, Some(&good)).await;

    let channel = tls_channel(&proxy.addr, &ca, Some(&good))
        .await
        .expect("a client with a certificate from the client CA connects");
    kv_works(channel).await.expect("and is served");

    let strangers = Ca::new("stranger CA");
    for (what, identity) in [
        ("no certificate", None),
        (
            "a certificate from another CA",
            Some(strangers.client("app-b")),
        ),
        (
            "an expired certificate",
            Some(clients.expired_client("app-c")),
        ),
    ] {
        let served = match tls_channel(&proxy.addr, &ca, identity.as_ref()).await {
            Err(_) => false,
            // TLS 1.3: the server's refusal may arrive with the first call.
            Ok(ch) => kv_works(ch).await.is_ok(),
        };
        assert!(!served, "a client with {what} was served");
    }
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_open_ones_live_on() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    old_ca.server().write(dir.path(), "server");
    let proxy = proxy(dir.path(), None).await;
    wait_ready(&proxy, &old_ca, None).await;
    let open = tls_channel(&proxy.addr, &old_ca, None)
        .await
        .expect("TLS with the first certificate");
    kv_works(open.clone()).await.expect("served");
    // A stream opened before the rotation, too.
    let mut stream = PubSubClient::new(open.clone())
        .subscribe(SubscribeRequest {
            namespace: "default".into(),
            topic: "rotation".into(),
            queue_group: String::new(),
        })
        .await
        .expect("subscribe over TLS")
        .into_inner();

    // The files are replaced (as cert-manager or certbot does): no signal,
    // no restart.
    let new_ca = Ca::new("new CA");
    new_ca.server().write(dir.path(), "server");
    eventually("new connections to get the new certificate", || async {
        tls_channel(&proxy.addr, &new_ca, None).await.ok()
    })
    .await;
    // The connection opened before the rotation still serves, and its
    // stream still delivers (a message published over a new connection).
    kv_works(open).await.expect("the open connection lives on");
    let fresh = tls_channel(&proxy.addr, &new_ca, None).await.unwrap();
    // Published until one arrives: the subscription may be registered at
    // the pattern a moment after the stream opened.
    let deadline = tokio::time::Instant::now() + trellis_tests::PATIENCE;
    let got = loop {
        PubSubClient::new(fresh.clone())
            .publish(PublishRequest {
                namespace: "default".into(),
                topic: "rotation".into(),
                payload: b"after".to_vec(),
                attributes: Default::default(),
            })
            .await
            .expect("publish over the new certificate");
        let next = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
        if let Ok(Ok(Some(m))) = next {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream opened before the rotation delivered nothing: {next:?}"
        );
    };
    assert_eq!(got.payload, b"after");
    assert!(
        tls_channel(&proxy.addr, &old_ca, None).await.is_err(),
        "a new connection still got the old certificate"
    );
    assert!(
        proxy.log_text().contains("TLS certificate loaded"),
        "the rotation is logged"
    );
}
