//! TLS on the proxy's doors, with rustls (ring; no OpenSSL): the
//! certificate chain and key from files, optionally a client CA for mutual
//! TLS. rustls's defaults: TLS 1.2 and 1.3, modern cipher suites only.
//!
//! The files are read again when they change (checked every
//! [`WATCH_EVERY`]; a rotation by cert-manager or certbot replaces them) and
//! on every reload: new connections then use the new certificate, open
//! ones keep theirs. A change that does not load (a half-written file, a
//! key that does not match) is logged and the old certificate kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

/// How often the files are checked for a change.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The `tls:` section: TLS on every door (gRPC, HTTP, admin).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The server's certificate chain, PEM (leaf first).
    pub cert_file: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to:
    /// mutual TLS. Absent: clients are not asked for one.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: `required` (the default; a client without a
    /// valid certificate is refused) or `optional` (one is verified when
    /// sent).
    #[serde(default)]
    pub client_auth: ClientAuth,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

/// Which protocols a door offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2 only.
    H2,
    /// HTTP/JSON (and the admin door): HTTP/2 and HTTP/1.1.
    H2AndHttp1,
}

/// Why the TLS files do not load; names the setting.
#[derive(Debug, thiserror::Error)]
#[error("tls.{field}: {message}")]
pub struct TlsError {
    pub field: &'static str,
    pub message: String,
}

fn problem(field: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        field,
        message: message.into(),
    }
}

/// The two server configurations (by ALPN), built from the files.
struct Configs {
    h2: Arc<ServerConfig>,
    both: Arc<ServerConfig>,
    /// The files' modification times when read.
    stamps: Vec<Option<SystemTime>>,
}

/// TLS for the doors: hands each new connection the current configuration.
pub struct Tls {
    settings: Settings,
    current: ArcSwap<Configs>,
}

impl Tls {
    /// Reads and checks the files; every problem names its setting.
    pub fn load(settings: &Settings) -> Result<Arc<Tls>, TlsError> {
        let configs = build(settings)?;
        Ok(Arc::new(Tls {
            settings: settings.clone(),
            current: ArcSwap::from_pointee(configs),
        }))
    }

    /// The TLS handshake on an accepted connection, with the current
    /// certificate.
    pub async fn accept(
        &self,
        alpn: Alpn,
        stream: TcpStream,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let configs = self.current.load();
        let config = match alpn {
            Alpn::H2 => configs.h2.clone(),
            Alpn::H2AndHttp1 => configs.both.clone(),
        };
        TlsAcceptor::from(config).accept(stream).await
    }

    /// Reads the files again; keeps the old certificate if they do not
    /// load. Returns whether the new ones are in use.
    pub fn refresh(&self, why: &str) -> bool {
        match build(&self.settings) {
            Ok(configs) => {
                self.current.store(Arc::new(configs));
                info!(why, cert = %self.settings.cert_file.display(), "TLS certificate loaded");
                true
            }
            Err(e) => {
                warn!(why, error = %e, "the TLS files did not load; the previous certificate stays in use");
                false
            }
        }
    }

    /// Refreshes whenever a file's modification time changes, until the
    /// task is aborted.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = stamps(&self.settings);
            if now != self.current.load().stamps {
                // A failed load keeps the old stamps: the next tick tries
                // again (a rotation may have written one file of two).
                self.refresh("the files changed");
            }
        }
    }
}

/// A connection's stream: plain TCP, or TLS over it.
pub type Stream = tokio_util::either::Either<TcpStream, TlsStream<TcpStream>>;

/// How long a client may take over the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One door's TLS: the proxy's certificates and the door's ALPN.
#[derive(Clone)]
pub struct DoorTls {
    pub tls: Arc<Tls>,
    pub alpn: Alpn,
}

/// The stream to serve on an accepted connection: as it is without TLS,
/// else after the handshake (bounded by [`HANDSHAKE_TIMEOUT`]). A client
/// that speaks plaintext to a TLS door fails here, and its connection is
/// closed.
pub async fn handshake(tls: Option<&DoorTls>, stream: TcpStream) -> std::io::Result<Stream> {
    use tokio_util::either::Either;
    let Some(door) = tls else {
        return Ok(Either::Left(stream));
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, door.tls.accept(door.alpn, stream)).await {
        Ok(Ok(s)) => Ok(Either::Right(s)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the TLS handshake did not finish in time",
        )),
    }
}

/// What every door does with an accepted connection, in its own task: the
/// handshake ([`handshake`]; a failure is logged at debug and the
/// connection dropped), then `None` as well when the door began closing
/// meanwhile (the connection would miss its GOAWAY).
pub async fn open(
    tls: Option<&DoorTls>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    closing: &tokio_util::sync::CancellationToken,
) -> Option<Stream> {
    let stream = match handshake(tls, stream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
    };
    (!closing.is_cancelled()).then_some(stream)
}

fn files(settings: &Settings) -> Vec<&Path> {
    let mut files = vec![settings.cert_file.as_path(), settings.key_file.as_path()];
    files.extend(settings.client_ca_file.as_deref());
    files
}

fn stamps(settings: &Settings) -> Vec<Option<SystemTime>> {
    files(settings)
        .into_iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| problem(field, format!("cannot read {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            problem(
                field,
                format!("{} is not PEM certificates: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(problem(
            field,
            format!(
                "{} holds no certificate (PEM `BEGIN CERTIFICATE`)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn build(settings: &Settings) -> Result<Configs, TlsError> {
    // Stamped before reading: a change while reading is seen next time.
    let stamps = stamps(settings);
    let certs = read_certs("cert_file", &settings.cert_file)?;
    let key_bytes = std::fs::read(&settings.key_file).map_err(|e| {
        problem(
            "key_file",
            format!("cannot read {}: {e}", settings.key_file.display()),
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        problem(
            "key_file",
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                settings.key_file.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem("cert_file", e.to_string()))?;
    let builder = match &settings.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("client_ca_file", path)? {
                roots.add(ca).map_err(|e| {
                    problem(
                        "client_ca_file",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| problem("client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        problem(
            "key_file",
            format!("does not fit the certificate in tls.cert_file: {e}"),
        )
    })?;
    let with_alpn = |protocols: &[&[u8]]| {
        let mut c = config.clone();
        c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    };
    Ok(Configs {
        h2: with_alpn(&[b"h2"]),
        both: with_alpn(&[b"h2", b"http/1.1"]),
        stamps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Settings {
        Settings {
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            client_ca_file: None,
            client_auth: ClientAuth::Required,
        }
    }

    fn write_pair(dir: &Path, name: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn problems_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let e = Tls::load(&settings(dir.path())).err().unwrap();
        assert_eq!(e.field, "cert_file");
        assert!(
            e.to_string().starts_with("tls.cert_file: cannot read"),
            "{e}"
        );
        std::fs::write(dir.path().join("tls.crt"), "not pem").unwrap();
        let e = Tls::load(&settings(dir.path())).err().unwrap();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        write_pair(dir.path(), "a");
        let key_of_another = {
            let other = tempfile::tempdir().unwrap();
            write_pair(other.path(), "b");
            std::fs::read(other.path().join("tls.key")).unwrap()
        };
        std::fs::write(dir.path().join("tls.key"), key_of_another).unwrap();
        let e = Tls::load(&settings(dir.path())).err().unwrap();
        assert_eq!(e.field, "key_file", "{e}");
        let mut s = settings(dir.path());
        write_pair(dir.path(), "a");
        s.client_ca_file = Some(dir.path().join("missing-ca.crt"));
        let e = Tls::load(&s).err().unwrap();
        assert_eq!(e.field, "client_ca_file", "{e}");
    }

    #[test]
    fn a_bad_rotation_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a");
        let tls = Tls::load(&settings(dir.path())).unwrap();
        let before = Arc::as_ptr(&tls.current.load_full());
        std::fs::write(dir.path().join("tls.key"), "half written").unwrap();
        assert!(!tls.refresh("test"));
        assert_eq!(Arc::as_ptr(&tls.current.load_full()), before);
        write_pair(dir.path(), "a");
        assert!(tls.refresh("test"));
        assert_ne!(Arc::as_ptr(&tls.current.load_full()), before);
    }
}
