//! What the backend patterns (trellis-redis, trellis-postgres,
//! trellis-nats) share in their `config:` blocks, read and checked once at
//! `Initialize` so every mistake names its setting:
//!
//! - [`Tls`]: the `tls:` block (`ca_file`, `cert_file`, `key_file`), its
//!   files read into [`TlsFiles`], and the rustls client configuration
//!   built from them (the `ring` provider; no OpenSSL).
//! - [`read_secret`]: a credential read from a file or an environment
//!   variable *named* in the config (`password_file`, `password_env`, …),
//!   held as a [`Secret`] that never prints.
//! - [`redact_url`]: a URL with its password hidden, for every log line and
//!   message that shows one.
//!
//! It depends on pattern-sdk only for [`FieldViolation`], the shape of a
//! config problem.

mod secret;
mod tls;

pub use secret::{Secret, read_secret};
pub use tls::{ClientIdentity, Tls, TlsFiles, looks_like_tls, tls_hint};

pub use pattern_sdk::FieldViolation;

/// `url` with the password in its userinfo replaced by `***`
/// (`redis://:pw@h` → `redis://:***@h`, `nats://u:pw@h` → `nats://u:***@h`).
/// Userinfo without a `:` is hidden whole: for NATS it is a token.
pub fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme + 3..];
    // The authority ends at the first '/', '?' or '#' after the last '@'
    // that comes before it; a '@' later (in a path) is not userinfo.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{}{shown}{}", &url[..scheme + 3], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(redact_url("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("rediss://user:pw@h:1"), "rediss://user:***@h:1");
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("redis://h:1/a@b"), "redis://h:1/a@b");
        assert_eq!(redact_url("host=h user=u"), "host=h user=u");
    }
}
