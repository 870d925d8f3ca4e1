//! Who is calling, and what they may do: the `identities:` and `access:`
//! settings, checked at the doors.
//!
//! - A caller's **identity** is a bearer token (`authorization: Bearer
//!   <token>`, matched against the SHA-256 of each configured token in
//!   constant time) or, without one, the name in its mTLS client
//!   certificate (first DNS or URI SAN, else the CN). A token sent is
//!   always the one that counts: a bad token is refused even on a
//!   connection with a good certificate.
//! - **Access rules** grant an identity roles on namespaces (globs with
//!   `*`): `read` (Get, List, Subscribe), `write` (Put, Delete, Publish),
//!   `admin` (every `trellis.admin.v1.Admin` call; its namespaces are not
//!   looked at: the admin API acts on patterns).
//!
//! Without `access:` nothing is checked (and no identity is established):
//! the proxy behaves as it did before access control. With it, data calls
//! are checked by the `Access` layer of the data plane (before `Route`, so
//! a caller learns nothing about namespaces it may not use) and admin
//! calls by the admin door's `FrontDoor`. Health, reflection, `/livez`,
//! `/readyz`, `/metrics` and `/openapi.json` stay open for probes.
//!
//! Tokens are never in the configuration in plain text (a hash, or a file),
//! never logged, never in an error, and never forwarded to a pattern.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::config::Problem;
use crate::error::ApiError;

/// The `WWW-Authenticate` challenge of a 401 (RFC 6750 §3).
pub const CHALLENGE: &str = "Bearer realm=\"trellis\"";

/// The gRPC path prefix of the admin API: the calls the `admin` role opens.
pub const ADMIN_PREFIX: &str = "/trellis.admin.v1.Admin/";

/// One entry of `identities:`. Neither token field: the identity is known
/// only by its client certificate.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub name: String,
    /// The SHA-256 of the token, 64 hex digits (`sha256sum`).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// A file holding the token itself (surrounding whitespace ignored),
    /// read at start and on every reload.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

// Redacted: the hash of a token is as good as the token to anyone who
// can replay a dictionary, and nothing needs to print it.
impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("name", &self.name)
            .field(
                "token_sha256",
                &self.token_sha256.as_ref().map(|_| "<redacted>"),
            )
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// One entry of `access:`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub identity: String,
    /// Namespace names or globs (`*` matches any run of characters).
    pub namespaces: Vec<String>,
    /// `read`, `write`, `admin` (strings, so a wrong one is reported with
    /// its field and the allowed values).
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The certificate name of the connection a request came on, put in the
/// request's extensions by the door (beside `dataplane::Peer`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity(pub Arc<str>);

/// The identity a client certificate names: its first DNS or URI SAN,
/// else its subject CN. `None` for a certificate that names nothing (or
/// does not parse; rustls has verified it already).
pub fn certificate_name(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) if !n.is_empty() => {
                    return Some(n.to_string());
                }
                _ => {}
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(str::to_string)
}

/// The identity of a TLS connection's client certificate, if it sent one.
pub fn of_stream(stream: &crate::tls::Stream) -> Option<CertIdentity> {
    let tokio_util::either::Either::Right(tls) = stream else {
        return None;
    };
    let first = tls.get_ref().1.peer_certificates()?.first()?;
    certificate_name(first.as_ref()).map(|n| CertIdentity(n.into()))
}

/// A namespace glob: `*` matches any run of characters (none included);
/// every other character itself. Hand-written rather than `globset`:
/// namespace names have a small alphabet with no `/`, `?` or `[`, so one
/// wildcard is the whole language, and a regex engine per rule buys
/// nothing.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and where in `name` its match ends now.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last `*` take one more character.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

struct Token {
    sha256: [u8; 32],
    identity: Arc<str>,
}

struct Rule {
    identity: Arc<str>,
    namespaces: Vec<String>,
    roles: Vec<Role>,
}

/// `identities:` and `access:` ready for checking calls: token hashes
/// decoded, token files read.
pub struct Rules {
    tokens: Vec<Token>,
    rules: Vec<Rule>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("tokens", &self.tokens.len())
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

fn problem(field: String, message: impl Into<String>) -> Problem {
    Problem {
        field,
        message: message.into(),
    }
}

fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Reads a token file; the problem never quotes the file's content.
fn read_token(field: String, path: &Path) -> Result<[u8; 32], Problem> {
    let bytes = std::fs::read(path).map_err(|e| {
        problem(
            field.clone(),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(problem(
            field,
            format!("{} is empty; put the token in it", path.display()),
        ));
    }
    Ok(Sha256::digest(token).into())
}

fn is_namespace_glob(p: &str) -> bool {
    !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_*".contains(c))
}

impl Rules {
    /// `None` when `access` is absent (nothing is checked). Every problem
    /// names its field; token files are read here.
    pub fn build(
        identities: &[IdentityConfig],
        access: Option<&[Grant]>,
    ) -> Result<Option<Rules>, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut tokens = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (i, id) in identities.iter().enumerate() {
            let at = |f: &str| format!("identities[{i}].{f}");
            if !crate::config::valid_identity(&id.name) {
                problems.push(problem(
                    at("name"),
                    format!(
                        "{:?} is not a valid identity name; allowed: 1 to 253 of a-z A-Z 0-9 \
                         . - _ : / @ (a certificate's DNS or URI name fits)",
                        id.name
                    ),
                ));
            } else if names.contains(&id.name.as_str()) {
                problems.push(problem(
                    at("name"),
                    format!("{:?} is defined twice; names must be unique", id.name),
                ));
            }
            names.push(&id.name);
            let sha256 = match (&id.token_sha256, &id.token_file) {
                (Some(_), Some(_)) => {
                    problems.push(problem(
                        at("token_file"),
                        "give token_sha256 or token_file, not both",
                    ));
                    None
                }
                (Some(hex), None) => match decode_hex(hex) {
                    Some(h) => Some(h),
                    None => {
                        // The value is not quoted: it may be a token pasted
                        // by mistake.
                        problems.push(problem(
                            at("token_sha256"),
                            format!(
                                "is not 64 hex digits ({} characters); write the SHA-256 of \
                                 the token, e.g. `printf %s \"$TOKEN\" | sha256sum`",
                                hex.len()
                            ),
                        ));
                        None
                    }
                },
                (None, Some(path)) => match read_token(at("token_file"), path) {
                    Ok(h) => Some(h),
                    Err(p) => {
                        problems.push(p);
                        None
                    }
                },
                (None, None) => None,
            };
            if let Some(sha256) = sha256 {
                tokens.push(Token {
                    sha256,
                    identity: id.name.as_str().into(),
                });
            }
        }
        let mut rules = Vec::new();
        for (i, g) in access.unwrap_or_default().iter().enumerate() {
            let at = |f: &str| format!("access[{i}].{f}");
            if !names.contains(&g.identity.as_str()) {
                problems.push(problem(
                    at("identity"),
                    format!(
                        "{:?} is not defined under identities; defined: {}",
                        g.identity,
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
            }
            if g.namespaces.is_empty() {
                problems.push(problem(
                    at("namespaces"),
                    "is empty; list namespaces or globs, e.g. [\"orders-*\"] or [\"*\"]",
                ));
            }
            for (j, ns) in g.namespaces.iter().enumerate() {
                if !is_namespace_glob(ns) {
                    problems.push(problem(
                        format!("access[{i}].namespaces[{j}]"),
                        format!(
                            "{ns:?} is not a namespace or glob; allowed: a-z 0-9 - _ and * (any \
                             run of characters)"
                        ),
                    ));
                }
            }
            if g.roles.is_empty() {
                problems.push(problem(
                    at("roles"),
                    "is empty; allowed: read, write, admin",
                ));
            }
            let mut roles = Vec::new();
            for (j, r) in g.roles.iter().enumerate() {
                match Role::parse(r) {
                    Some(role) => roles.push(role),
                    None => problems.push(problem(
                        format!("access[{i}].roles[{j}]"),
                        format!("{r:?} is not a role; allowed: read, write, admin"),
                    )),
                }
            }
            rules.push(Rule {
                identity: g.identity.as_str().into(),
                namespaces: g.namespaces.clone(),
                roles,
            });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(access.map(|_| Rules { tokens, rules }))
    }

    /// From the proxy's configuration.
    pub fn of(config: &crate::config::Config) -> Result<Option<Rules>, Vec<Problem>> {
        Rules::build(&config.identities, config.access.as_deref())
    }

    /// The caller's identity: its bearer token's, else its certificate's.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        cert: Option<&CertIdentity>,
    ) -> Result<Arc<str>, ApiError> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return match cert {
                Some(c) => Ok(c.0.clone()),
                None => Err(unauthenticated(
                    "CREDENTIALS_MISSING",
                    "this call needs credentials: send `authorization: Bearer <token>` (gRPC \
                     metadata or HTTP header) or a client certificate",
                )),
            };
        };
        let token = value
            .as_bytes()
            .split_at_checked(7)
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|(_, t)| t.trim_ascii())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthenticated(
                    "MALFORMED_AUTHORIZATION",
                    "the authorization header is not `Bearer <token>`",
                )
            })?;
        let presented: [u8; 32] = Sha256::digest(token).into();
        // Every configured token is compared, each in constant time: the
        // time taken says nothing about which one (nearly) matched.
        let mut found = None;
        for t in &self.tokens {
            if trellis_proto::protocol::secret_matches(&presented, &t.sha256) {
                found = Some(t.identity.clone());
            }
        }
        found.ok_or_else(|| {
            unauthenticated(
                "TOKEN_UNKNOWN",
                "the bearer token is not one the proxy knows (identities: in its \
                 configuration); check the token, or ask for one",
            )
        })
    }

    /// Whether `identity` has `role` on `namespace` (for `admin`, the
    /// namespace is `None`: any grant of the role counts).
    pub fn allows(&self, identity: &str, namespace: Option<&str>, role: Role) -> bool {
        self.rules.iter().any(|r| {
            &*r.identity == identity
                && r.roles.contains(&role)
                && namespace.is_none_or(|ns| r.namespaces.iter().any(|p| glob_matches(p, ns)))
        })
    }

    /// `Ok` if `identity` may act as `role` on `namespace`, else
    /// PERMISSION_DENIED naming the three.
    pub fn authorize(
        &self,
        identity: &str,
        namespace: Option<&str>,
        role: Role,
    ) -> Result<(), ApiError> {
        if self.allows(identity, namespace, role) {
            return Ok(());
        }
        let (message, e) = match namespace {
            Some(ns) => (
                format!(
                    "identity {identity:?} does not have the {} role on namespace {ns:?}; an \
                     access: rule must grant it",
                    role.as_str()
                ),
                Some(ns),
            ),
            None => (
                format!(
                    "identity {identity:?} does not have the admin role the admin API needs; an \
                     access: rule must grant it"
                ),
                None,
            ),
        };
        let mut err = ApiError::new(Code::PermissionDenied, "ROLE_MISSING", message)
            .meta("identity", identity)
            .meta("role", role.as_str());
        if let Some(ns) = e {
            err = err.meta("namespace", ns);
        }
        Err(err)
    }

    /// Authenticates and authorizes in one step.
    pub fn check(
        &self,
        headers: &HeaderMap,
        cert: Option<&CertIdentity>,
        namespace: Option<&str>,
        role: Role,
    ) -> Result<Arc<str>, ApiError> {
        let who = self.authenticate(headers, cert)?;
        self.authorize(&who, namespace, role)?;
        Ok(who)
    }
}

fn unauthenticated(reason: &str, message: &str) -> ApiError {
    ApiError::new(Code::Unauthenticated, reason, message)
}

/// The access rules in force, shared by the doors and replaced whole by a
/// reload (`arc-swap`: a call reads them once, without a lock).
#[derive(Clone, Default)]
pub struct Access(Arc<ArcSwapOption<Rules>>);

impl Access {
    /// Nothing is checked.
    pub fn off() -> Self {
        Access::default()
    }

    pub fn new(rules: Option<Rules>) -> Self {
        Access(Arc::new(ArcSwapOption::from(rules.map(Arc::new))))
    }

    /// The rules for calls from now on.
    pub fn set(&self, rules: Option<Rules>) {
        self.0.store(rules.map(Arc::new));
    }

    /// The rules in force; `None`: access is not checked.
    pub fn rules(&self) -> Option<Arc<Rules>> {
        self.0.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret-token-a";

    fn sha(t: &str) -> String {
        Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn id(name: &str, hash: Option<String>) -> IdentityConfig {
        IdentityConfig {
            name: name.into(),
            token_sha256: hash,
            token_file: None,
        }
    }

    fn grant(identity: &str, namespaces: &[&str], roles: &[&str]) -> Grant {
        Grant {
            identity: identity.into(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        h
    }

    #[test]
    fn globs_match_runs_of_characters() {
        for (p, n) in [
            ("*", "anything"),
            ("*", ""),
            ("orders-*", "orders-eu"),
            ("orders-*", "orders-"),
            ("*-eu", "orders-eu"),
            ("a*b*c", "aXXbYYc"),
            ("default", "default"),
        ] {
            assert!(glob_matches(p, n), "{p} ~ {n}");
        }
        for (p, n) in [
            ("orders-*", "orders"),
            ("orders-*", "xorders-a"),
            ("default", "default2"),
            ("a*b", "ac"),
        ] {
            assert!(!glob_matches(p, n), "{p} !~ {n}");
        }
    }

    #[test]
    fn absent_access_checks_nothing() {
        let rules = Rules::build(&[id("a", Some(sha(TOKEN)))], None).unwrap();
        assert!(rules.is_none());
    }

    #[test]
    fn tokens_and_certificates_identify_and_roles_decide() {
        let rules = Rules::build(
            &[id("app-a", Some(sha(TOKEN))), id("app-c", None)],
            Some(&[
                grant("app-a", &["default", "orders-*"], &["read", "write"]),
                grant("app-c", &["default"], &["read"]),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(&*rules.authenticate(&bearer(TOKEN), None).unwrap(), "app-a");
        let cert = CertIdentity("app-c".into());
        assert_eq!(
            &*rules.authenticate(&HeaderMap::new(), Some(&cert)).unwrap(),
            "app-c"
        );
        // A token sent is the one that counts, even beside a certificate.
        let bad = rules
            .authenticate(&bearer("nope"), Some(&cert))
            .unwrap_err();
        assert_eq!(bad.code, Code::Unauthenticated);
        assert!(!bad.message.contains("nope"), "{}", bad.message);
        let none = rules.authenticate(&HeaderMap::new(), None).unwrap_err();
        assert_eq!(none.reason, "CREDENTIALS_MISSING");
        let mut basic = HeaderMap::new();
        basic.insert("authorization", "Basic YTpi".parse().unwrap());
        assert_eq!(
            rules.authenticate(&basic, None).unwrap_err().reason,
            "MALFORMED_AUTHORIZATION"
        );

        assert!(rules.allows("app-a", Some("orders-eu"), Role::Write));
        assert!(!rules.allows("app-a", Some("billing"), Role::Read));
        assert!(!rules.allows("app-c", Some("default"), Role::Write));
        assert!(!rules.allows("app-a", None, Role::Admin));
        let denied = rules
            .authorize("app-c", Some("default"), Role::Write)
            .unwrap_err();
        assert_eq!(denied.code, Code::PermissionDenied);
        for part in ["\"app-c\"", "write", "\"default\""] {
            assert!(denied.message.contains(part), "{}", denied.message);
        }
    }

    #[test]
    fn every_problem_names_its_field_and_never_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let not_hex = "this-is-a-pasted-token-not-a-hash-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
        let problems = Rules::build(
            &[
                id("app-a", Some(not_hex.into())),
                IdentityConfig {
                    name: "app-b".into(),
                    token_sha256: None,
                    token_file: Some(dir.path().join("missing")),
                },
                IdentityConfig {
                    name: "app-e".into(),
                    token_sha256: None,
                    token_file: Some(empty),
                },
                id("app-a", None),
                id("bad name", None),
            ],
            Some(&[
                grant("app-a", &["default"], &["read"]),
                grant("ghost", &["Bad!"], &["rwx"]),
            ]),
        )
        .unwrap_err();
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect();
        let has = |prefix: &str| text.iter().any(|t| t.starts_with(prefix));
        assert!(
            has("identities[0].token_sha256: is not 64 hex digits"),
            "{text:#?}"
        );
        assert!(has("identities[1].token_file: cannot read"), "{text:#?}");
        assert!(has("identities[2].token_file:"), "{text:#?}");
        assert!(
            has("identities[3].name: \"app-a\" is defined twice"),
            "{text:#?}"
        );
        assert!(has("identities[4].name:"), "{text:#?}");
        assert!(
            has("access[1].identity: \"ghost\" is not defined"),
            "{text:#?}"
        );
        assert!(has("access[1].namespaces[0]:"), "{text:#?}");
        assert!(
            text.contains(
                &"access[1].roles[0]: \"rwx\" is not a role; allowed: read, write, admin"
                    .to_string()
            ),
            "{text:#?}"
        );
        assert!(text.iter().all(|t| !t.contains(not_hex)), "{text:#?}");
    }

    #[test]
    fn a_token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
        let rules = Rules::build(
            &[IdentityConfig {
                name: "app-b".into(),
                token_sha256: None,
                token_file: Some(file),
            }],
            Some(&[grant("app-b", &["*"], &["admin"])]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(&*rules.authenticate(&bearer(TOKEN), None).unwrap(), "app-b");
        assert!(rules.allows("app-b", None, Role::Admin));
    }

    #[test]
    fn debug_redacts_the_hash() {
        let shown = format!("{:?}", id("a", Some(sha(TOKEN))));
        assert!(!shown.contains(&sha(TOKEN)), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn a_certificate_is_named_by_its_first_san_else_its_cn() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["app-c".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_name(cert.der()).as_deref(), Some("app-c"));
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ops");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_name(cert.der()).as_deref(), Some("ops"));
    }
}
