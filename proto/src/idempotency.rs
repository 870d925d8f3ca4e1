//! The idempotency-key protocol between the proxy and patterns (see
//! pattern-sdk's `idempotency` and docs/idempotency.md): the metadata
//! names, the key rule and the request fingerprint, in one place for the
//! proxy, the SDK and the conformance kit.

use std::time::Duration;

use sha2::{Digest, Sha256};

/// The data methods that change data, and so take a key (`Get`, `List`
/// and `Subscribe` are safe to repeat without one).
pub const WRITES: &[&str] = &["Put", "Delete", "Publish"];

/// The client's key.
pub const KEY: &str = "idempotency-key";
/// The request's fingerprint, made by the proxy.
pub const FINGERPRINT: &str = "trellis-idempotency-fingerprint";
/// How long the record is kept, in milliseconds, set by the proxy.
pub const RETENTION_MS: &str = "trellis-idempotency-retention-ms";
/// Response metadata on a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// The longest a record may be kept (the proxy's policy allows 1 s to this).
pub const MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The shortest a record is kept.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);
/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 255;
/// How long a record is kept when the caller does not say.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Whether `key` is a valid idempotency key; else the rule it breaks.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "must be 1 to {MAX_KEY_LEN} characters (it is {}); use a UUID or another unique token per write",
            key.len()
        ));
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(
            "must be printable ASCII (0x20 to 0x7E); use a UUID or another unique token per write"
                .into(),
        );
    }
    Ok(())
}

/// The fingerprint of `message` sent to `path`: hex SHA-256 of the path, a
/// newline, and the message's bytes.
pub fn fingerprint(path: &str, message: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(message);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The fingerprint of a keyed write by the authenticated `identity` (with
/// `access:` configured): the identity is part of the request, so another
/// caller who reuses the key gets IDEMPOTENCY_KEY_REUSED, never the first
/// caller's stored answer. Hex SHA-256 of `identity:`, the identity, a
/// newline, then as [`fingerprint`].
pub fn identity_fingerprint(identity: &str, path: &str, message: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"identity:");
    h.update(identity.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(message);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_rule() {
        assert!(check_key("8e0f-uuid").is_ok());
        assert!(check_key(&"k".repeat(255)).is_ok());
        assert!(check_key("").is_err());
        assert!(
            check_key(&"k".repeat(256))
                .unwrap_err()
                .contains("1 to 255")
        );
        assert!(check_key("tab\there").unwrap_err().contains("printable"));
    }

    #[test]
    fn fingerprints_differ_by_method_and_message() {
        let a = fingerprint("/trellis.data.v1.KeyValue/Put", b"x");
        assert_eq!(a.len(), 64);
        assert_eq!(a, fingerprint("/trellis.data.v1.KeyValue/Put", b"x"));
        assert_ne!(a, fingerprint("/trellis.data.v1.KeyValue/Put", b"y"));
        assert_ne!(a, fingerprint("/trellis.data.v1.KeyValue/Delete", b"x"));
        let by = |who| identity_fingerprint(who, "/trellis.data.v1.KeyValue/Put", b"x");
        assert_ne!(by("app-a"), by("app-b"));
        assert_ne!(by("app-a"), a);
        assert_eq!(by("app-a"), by("app-a"));
    }
}
