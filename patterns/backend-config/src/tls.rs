//! The `tls:` block of a backend pattern: which CA to trust, and the
//! client certificate for mutual TLS. The server's certificate is always
//! verified: it must chain to the CA (or, without `ca_file`, to one of the
//! system's roots) and name the host the pattern connects to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pattern_sdk::FieldViolation;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The `tls:` block.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM file with the CA certificate(s) that signed the server's
    /// certificate. Without it, the system's roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM file with this client's certificate (chain), for a server that
    /// asks for one (mutual TLS). Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// A client certificate and its key, as read.
pub struct ClientIdentity {
    /// The certificate file's PEM text.
    pub cert_pem: Vec<u8>,
    /// The key file's PEM text.
    pub key_pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The files of a [`Tls`] block, read and parsed.
pub struct TlsFiles {
    /// The CA file's PEM text and its certificates, when `ca_file` is set.
    pub ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    pub client: Option<ClientIdentity>,
}

impl Tls {
    /// Reads and parses every file named. Each problem names its setting,
    /// `{prefix}.ca_file` and so on (`prefix` is e.g. `config.tls`).
    pub fn load(&self, prefix: &str) -> Result<TlsFiles, Vec<FieldViolation>> {
        let mut problems = Vec::new();
        let field = |name: &str| format!("{prefix}.{name}");
        let ca = self.ca_file.as_deref().and_then(|path| {
            let f = field("ca_file");
            read(&f, path)
                .and_then(|pem| certificates(&f, path, &pem).map(|certs| (pem, certs)))
                .map_err(|v| problems.push(v))
                .ok()
        });
        let client = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                problems.push(FieldViolation::new(
                    field("key_file"),
                    format!(
                        "is needed with {}: the private key of the client certificate",
                        field("cert_file")
                    ),
                ));
                None
            }
            (None, Some(_)) => {
                problems.push(FieldViolation::new(
                    field("cert_file"),
                    format!(
                        "is needed with {}: the client certificate of that key",
                        field("key_file")
                    ),
                ));
                None
            }
            (Some(cert), Some(key)) => {
                let (cf, kf) = (field("cert_file"), field("key_file"));
                let chain = read(&cf, cert)
                    .and_then(|pem| certificates(&cf, cert, &pem).map(|c| (pem, c)))
                    .map_err(|v| problems.push(v))
                    .ok();
                let key = read(&kf, key)
                    .and_then(|pem| {
                        PrivateKeyDer::from_pem_slice(&pem)
                            .map(|k| (pem, k))
                            .map_err(|e| {
                                FieldViolation::new(
                                    &kf,
                                    format!(
                                        "{} holds no PEM private key ({e}); give the key of \
                                         the client certificate",
                                        key.display()
                                    ),
                                )
                            })
                    })
                    .map_err(|v| problems.push(v))
                    .ok();
                match (chain, key) {
                    (Some((cert_pem, chain)), Some((key_pem, key))) => Some(ClientIdentity {
                        cert_pem,
                        key_pem,
                        chain,
                        key,
                    }),
                    _ => None,
                }
            }
        };
        if problems.is_empty() {
            Ok(TlsFiles { ca, client })
        } else {
            Err(problems)
        }
    }
}

impl TlsFiles {
    /// A rustls client configuration: the CA's certificates as the only
    /// roots (the system's when there is no `ca_file`), the client
    /// certificate when there is one. `prefix` names the settings in
    /// errors.
    pub fn client_config(&self, prefix: &str) -> Result<rustls::ClientConfig, FieldViolation> {
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some((_, certs)) => {
                for cert in certs {
                    roots.add(cert.clone()).map_err(|e| {
                        FieldViolation::new(
                            format!("{prefix}.ca_file"),
                            format!("holds a certificate that cannot be a trust anchor: {e}"),
                        )
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(FieldViolation::new(
                        format!("{prefix}.ca_file"),
                        "is not set and the system has no CA certificates (install the \
                         ca-certificates package, or give the CA that signed the server's \
                         certificate here)",
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| FieldViolation::new(prefix, format!("no TLS version to offer: {e}")))?
            .with_root_certificates(roots);
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| {
                    FieldViolation::new(
                        format!("{prefix}.key_file"),
                        format!("does not go with {prefix}.cert_file: {e}"),
                    )
                }),
        }
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, FieldViolation> {
    std::fs::read(path).map_err(|e| {
        FieldViolation::new(
            field,
            format!(
                "cannot read {}: {e}; the pattern runs as the proxy's user, which must be \
                 able to read it",
                path.display()
            ),
        )
    })
}

fn certificates(
    field: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, FieldViolation> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            FieldViolation::new(
                field,
                format!("{} is not PEM certificates: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(FieldViolation::new(
            field,
            format!(
                "{} holds no certificate (want PEM: -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// Does an error's text look like a failed TLS handshake or certificate
/// check (rustls's and the client libraries' wording)?
pub fn looks_like_tls(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer", "alert"]
        .iter()
        .any(|w| e.contains(w))
}

/// What to check after a failed handshake, naming the settings
/// (`prefix` is e.g. `config.tls`; `url_field` where the host is set).
pub fn tls_hint(prefix: &str, tls: Option<&Tls>, url_field: &str) -> String {
    let ca = match tls.and_then(|t| t.ca_file.as_deref()) {
        Some(path) => format!("is {prefix}.ca_file ({}) the CA", path.display()),
        None => format!("{prefix}.ca_file is not set: is the system's trust store the CA"),
    };
    format!(
        "TLS: {ca} that signed the server's certificate, and does that certificate name \
         the host in {url_field}?"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_their_settings() {
        let tls = Tls {
            ca_file: Some("/x/ca.pem".into()),
            cert_file: Some("/x/c.pem".into()),
            key_file: None,
        };
        let Err(problems) = tls.load("config.tls") else {
            panic!("missing files loaded");
        };
        let shown: Vec<String> = problems
            .iter()
            .map(|v| format!("{}: {}", v.field, v.message))
            .collect();
        assert!(
            shown[0].starts_with("config.tls.ca_file: cannot read /x/ca.pem: No such file"),
            "{shown:?}"
        );
        assert!(
            shown[1].starts_with("config.tls.key_file: is needed"),
            "{shown:?}"
        );
        assert_eq!(shown.len(), 2);
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let tls = Tls {
            ca_file: Some(path),
            ..Tls::default()
        };
        let Err(problems) = tls.load("config.tls") else {
            panic!("a text file loaded as a CA");
        };
        assert!(
            problems[0].message.contains("holds no certificate"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn the_block_parses_and_refuses_unknown_fields() {
        let t: Tls = serde_json::from_str(r#"{"ca_file": "/ca.pem"}"#).unwrap();
        assert_eq!(t.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert!(serde_json::from_str::<Tls>(r#"{"ca": "/ca.pem"}"#).is_err());
    }

    #[test]
    fn hints_name_the_setting() {
        let tls = Tls {
            ca_file: Some("/ca.pem".into()),
            ..Tls::default()
        };
        let h = tls_hint("config.tls", Some(&tls), "config.url");
        assert!(h.contains("config.tls.ca_file (/ca.pem)"), "{h}");
        assert!(looks_like_tls("invalid peer certificate: UnknownIssuer"));
        assert!(!looks_like_tls("Connection refused (os error 111)"));
    }
}
