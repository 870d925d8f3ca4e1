//! Test certificates made on the spot with rcgen: a CA, server and client
//! certificates it signs, written as PEM files (private keys mode 0600, as
//! PostgreSQL insists). [`Pki`] is a ready-made set in a temporary folder.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    /// Its certificate, PEM.
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Ca { params, key, pem }
    }

    fn sign(&self, mut params: CertificateParams, purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        params.extended_key_usages = vec![purpose];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> Leaf {
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
        self.sign(params, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose identity (SAN) is `name`.
    pub fn client(&self, name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        self.sign(params, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate that expired in 2001.
    pub fn expired_client(&self, name: &str) -> Leaf {
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("client params");
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.sign(params, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Writes the CA certificate as `dir/<name>` and returns its path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        write(&path, &self.pem, 0o644);
        path
    }
}

impl Leaf {
    /// Writes `dir/<name>.crt` and `dir/<name>.key`; returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        // Key first, then certificate, each replaced whole (rename): a
        // watcher never reads a half-written file.
        for (path, text, mode) in [(&key, &self.key, 0o600), (&cert, &self.cert, 0o644)] {
            let tmp = path.with_extension("tmp");
            write(&tmp, text, mode);
            std::fs::rename(&tmp, path).expect("rename PEM");
        }
        (cert, key)
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A ready-made set in one temporary folder (alive as long as this): a CA,
/// a server certificate for `127.0.0.1` and `localhost` and a client
/// certificate (`trellis-client`) it signed, and another CA that signed
/// nothing here (the "wrong CA").
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir for test certificates");
        let ca = Ca::new("Trellis test CA");
        ca.write(dir.path(), "ca.pem");
        Ca::new("Some other CA").write(dir.path(), "other-ca.pem");
        ca.server().write(dir.path(), "server");
        ca.client("trellis-client").write(dir.path(), "client");
        Pki { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the server's and the client's certificates.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// A CA that signed neither.
    pub fn other_ca(&self) -> PathBuf {
        self.dir().join("other-ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir().join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir().join("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir().join("client.crt")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir().join("client.key")
    }

    /// Writes `secret` to a file of its own (mode 0600) and returns its
    /// path, for a pattern's `password_file`.
    pub fn secret_file(&self, name: &str, secret: &str) -> PathBuf {
        let path = self.dir().join(name);
        write(&path, &format!("{secret}\n"), 0o600);
        path
    }
}
