//! The backend patterns over TLS, against private servers whose
//! certificates the test makes (`trellis_tests::pki::Pki`): each pattern,
//! given the CA, serves the conformance kit through the proxy with a
//! password read from a file, and that password is in no log line; given
//! another CA, it does not serve (NOT_SERVING, as for an unreachable
//! backend), and its log and stderr tail name `config.tls.ca_file`.

use std::path::Path;

use pattern_sdk::conformance::pubsub::{self, Kit};
use pattern_sdk::conformance::{self, Options, Suite, Target};
use tonic::Code;
use trellis_proto::admin::v1::PatternState;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_tests::backends::{
    PostgresServer, RedisServer, RedisTls, TLS_USER, postgres_pattern, redis_pattern,
};
use trellis_tests::kv::get;
use trellis_tests::nats::NatsServer;
use trellis_tests::pki::Pki;
use trellis_tests::{PATIENCE, PatternEntry, Proxy, bin};

/// Distinctive, so finding it in a log cannot be a coincidence.
const PASSWORD: &str = "pw-7f3a9c1e-kept-out-of-logs";
const NS: &str = "kv";
const OTHER: &str = "kv-other";
/// A pattern that cannot verify its server is kept NOT_SERVING after this.
const SHORT_START: &str = "startup_timeout: 1s\nhealth:\n  interval: 250ms";

/// `tls:` with the CA (and a client certificate, for mutual TLS) plus
/// `password_file`, as YAML for a `config:` block.
fn tls_config(ca: &Path, client: Option<&Pki>, password_file: Option<&Path>) -> String {
    let mut y = format!("tls:\n  ca_file: {:?}\n", ca.display().to_string());
    if let Some(pki) = client {
        y.push_str(&format!(
            "  cert_file: {:?}\n  key_file: {:?}\n",
            pki.client_cert().display().to_string(),
            pki.client_key().display().to_string()
        ));
    }
    if let Some(file) = password_file {
        y.push_str(&format!(
            "password_file: {:?}\n",
            file.display().to_string()
        ));
    }
    y
}

/// The whole key-value kit through the proxy.
async fn kv_kit(proxy: &Proxy) {
    let options = Options {
        suites: vec![Suite::Kv],
        namespaces: Some((NS.into(), OTHER.into())),
        patience: PATIENCE,
        ..Options::default()
    };
    let reports = conformance::run(Target::Connect(proxy.addr.clone()), &options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        reports.len() == 1 && reports[0].all_passed(),
        "conformance checks failed:\n{}\nproxy log:\n{}",
        conformance::text(&reports),
        proxy.log_text()
    );
}

fn assert_password_never_logged(proxy: &Proxy) {
    let log = proxy.log_text();
    assert!(!log.is_empty());
    let leaked: Vec<&str> = log.lines().filter(|l| l.contains(PASSWORD)).collect();
    assert!(leaked.is_empty(), "the password is in the log: {leaked:#?}");
}

/// The pattern stays NOT_SERVING, and both the proxy's log and the
/// pattern's stderr tail (admin API) name the CA setting.
async fn refuses_the_server(proxy: &Proxy, pattern: &str) {
    proxy
        .wait_pattern(pattern, "NOT_SERVING with the wrong CA", |p| {
            p.state() == PatternState::NotServing
        })
        .await;
    let p = proxy
        .wait_pattern(pattern, "a stderr line naming config.tls.ca_file", |p| {
            p.stderr_tail
                .iter()
                .any(|l| l.contains("config.tls.ca_file"))
        })
        .await;
    let line = p
        .stderr_tail
        .iter()
        .find(|l| l.contains("config.tls.ca_file"))
        .cloned()
        .unwrap_or_default();
    println!("{pattern}: {line}");
    assert!(
        line.to_ascii_lowercase().contains("certificate") || line.contains("TLS"),
        "the line says what failed: {line}"
    );
    assert!(
        proxy.log_text().contains("config.tls.ca_file"),
        "the proxy log names the setting"
    );
}

#[tokio::test]
async fn redis_over_mutual_tls_with_a_password_file_conforms() {
    let pki = Pki::generate();
    let redis = RedisServer::start_tls(RedisTls {
        cert_file: pki.server_cert(),
        key_file: pki.server_key(),
        ca_file: pki.ca(),
        auth_clients: true,
        requirepass: Some(PASSWORD.into()),
    })
    .await;
    let password = pki.secret_file("redis-password", PASSWORD);
    let config = tls_config(&pki.ca(), Some(&pki), Some(&password));
    let proxy = Proxy::builder()
        .pattern(redis_pattern("cache", &[NS, OTHER], &redis.url(), &config))
        .start()
        .await;
    proxy.wait_serving("cache").await;
    kv_kit(&proxy).await;
    assert_password_never_logged(&proxy);
}

#[tokio::test]
async fn redis_with_the_wrong_ca_does_not_serve_and_says_why() {
    let pki = Pki::generate();
    let redis = RedisServer::start_tls(RedisTls {
        cert_file: pki.server_cert(),
        key_file: pki.server_key(),
        ca_file: pki.ca(),
        auth_clients: false,
        requirepass: None,
    })
    .await;
    let config = tls_config(&pki.other_ca(), None, None);
    let proxy = Proxy::builder()
        .pattern(redis_pattern("cache", &[NS], &redis.url(), &config))
        .with(SHORT_START)
        .spawn()
        .await;
    refuses_the_server(&proxy, "cache").await;
    let err = proxy.kv().await.get(get(NS, "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn postgres_over_tls_with_a_password_file_conforms() {
    let pki = Pki::generate();
    let pg = PostgresServer::start_tls(&pki).await;
    pg.create_tls_user(PASSWORD).await;
    let password = pki.secret_file("pg-password", PASSWORD);
    // The server refuses TLS_USER without TLS, and asks for its password.
    let url = format!("postgres://{TLS_USER}@127.0.0.1:{}/{TLS_USER}", pg.port());
    let config = format!(
        "{}purge_interval: 200ms\n",
        tls_config(&pki.ca(), None, Some(&password))
    );
    let proxy = Proxy::builder()
        .pattern(postgres_pattern("db", &[NS, OTHER], &url, &config))
        .start()
        .await;
    proxy.wait_serving("db").await;
    kv_kit(&proxy).await;
    assert_password_never_logged(&proxy);
}

#[tokio::test]
async fn postgres_with_the_wrong_ca_does_not_serve_and_says_why() {
    let pki = Pki::generate();
    let pg = PostgresServer::start_tls(&pki).await;
    pg.create_tls_user(PASSWORD).await;
    let password = pki.secret_file("pg-password", PASSWORD);
    let url = format!("postgres://{TLS_USER}@127.0.0.1:{}/{TLS_USER}", pg.port());
    let config = tls_config(&pki.other_ca(), None, Some(&password));
    let proxy = Proxy::builder()
        .pattern(postgres_pattern("db", &[NS], &url, &config))
        .with(SHORT_START)
        .spawn()
        .await;
    refuses_the_server(&proxy, "db").await;
    assert_password_never_logged(&proxy);
}

/// A trellis-nats entry for the TLS server at `port`.
fn nats_tls_pattern(port: u16, ca: &Path, password_file: &Path) -> PatternEntry {
    PatternEntry {
        config: format!(
            "url: \"tls://127.0.0.1:{port}\"\nconnect_timeout: 2s\nuser: app\n{}",
            tls_config(ca, None, Some(password_file))
        ),
        ..PatternEntry::new("nats", bin("trellis-nats"), &["events", "events-other"])
    }
}

#[tokio::test]
async fn nats_over_tls_with_a_password_file_conforms() {
    let pki = Pki::generate();
    let nats = NatsServer::start_tls(
        &pki.server_cert(),
        &pki.server_key(),
        Some(("app", PASSWORD)),
    )
    .await;
    let password = pki.secret_file("nats-password", PASSWORD);
    let proxy = Proxy::builder()
        .pattern(nats_tls_pattern(nats.port(), &pki.ca(), &password))
        .start()
        .await;
    proxy.wait_serving("nats").await;
    let kit = Kit::new(
        PubSubClient::new(proxy.channel().await),
        "events",
        "events-other",
    )
    .patience(PATIENCE);
    let report = pubsub::run_all(&kit).await;
    println!("{report}");
    assert!(
        report.all_passed(),
        "{report}\nproxy log:\n{}\nnats-server log:\n{}",
        proxy.log_text(),
        nats.log()
    );
    assert_password_never_logged(&proxy);
}

#[tokio::test]
async fn nats_with_the_wrong_ca_does_not_serve_and_says_why() {
    let pki = Pki::generate();
    let nats = NatsServer::start_tls(&pki.server_cert(), &pki.server_key(), None).await;
    let password = pki.secret_file("nats-password", PASSWORD);
    let proxy = Proxy::builder()
        .pattern(nats_tls_pattern(nats.port(), &pki.other_ca(), &password))
        // Past Initialize, which waits up to connect_timeout (2s) for a
        // first connection.
        .with("startup_timeout: 5s\nhealth:\n  interval: 250ms")
        .spawn()
        .await;
    refuses_the_server(&proxy, "nats").await;
    assert_password_never_logged(&proxy);
}
