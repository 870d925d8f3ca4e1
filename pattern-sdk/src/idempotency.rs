//! Idempotency keys: a write (`Put`, `Delete`, `Publish`) that carries an
//! `idempotency-key` takes effect once; a repeat with the same key and the
//! same request gets the first call's result, marked
//! `idempotent-replayed: true` (docs/idempotency.md).
//!
//! The record of a key must be committed atomically with the write, in the
//! same backend, or a crash between the two loses the guarantee. So the SDK
//! reads the protocol (this module) and each pattern stores: its
//! [`KeyValue::put_once`](crate::KeyValue::put_once),
//! [`delete_once`](crate::KeyValue::delete_once) and
//! [`PubSub::publish_once`](crate::PubSub::publish_once) claim the key,
//! write, and record the result in one atomic step, and answer an
//! [`Outcome`]. A pattern that cannot do that keeps the default methods,
//! which refuse keys with FAILED_PRECONDITION rather than pretend.
//!
//! The protocol, for patterns in any language (the proxy sets all three):
//! - `idempotency-key`: the client's key, 1–255 printable ASCII characters;
//! - `trellis-idempotency-fingerprint`: lowercase hex SHA-256 of the
//!   method's path (`/trellis.data.v1.KeyValue/Put`), a newline, and the
//!   request message's bytes as the client sent them;
//! - `trellis-idempotency-retention-ms`: how long to keep the record.

use std::time::Duration;

use tonic::metadata::MetadataMap;
pub use trellis_proto::idempotency::{
    DEFAULT_RETENTION, FINGERPRINT, KEY, MAX_KEY_LEN, MAX_RETENTION, MIN_RETENTION, REPLAYED,
    RETENTION_MS, check_key, fingerprint,
};

use crate::Error;

/// A write that must take effect once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    /// The client's key (1–255 printable ASCII), scoped by the namespace
    /// the write names: the same key in two namespaces is two keys.
    pub key: String,
    /// Lowercase hex SHA-256 of the method's path and the request message.
    pub fingerprint: String,
    /// How long the record must be kept after the write.
    pub retention: Duration,
}

/// What a write with an idempotency key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// It ran now, and its result is recorded under the key.
    Executed(T),
    /// An earlier call with this key and fingerprint ran: its result. The
    /// write was not done again.
    Replayed(T),
    /// The key was used for a different request (another fingerprint).
    Reused,
    /// The first call with this key has claimed it and not finished yet.
    InUse,
}

/// The call's [`Once`], if it carries an idempotency key. `message` is the
/// request re-encoded, for a fingerprint when the proxy sent none (a call
/// made straight to the pattern).
pub(crate) fn from_metadata(
    md: &MetadataMap,
    path: &str,
    message: impl FnOnce() -> Vec<u8>,
) -> Result<Option<Once>, Error> {
    let Some(key) = md.get(KEY) else {
        return Ok(None);
    };
    let key = key
        .to_str()
        .map_err(|_| Error::invalid_argument(KEY, "must be printable ASCII"))?;
    check_key(key).map_err(|rule| Error::invalid_argument(KEY, rule))?;
    let fingerprint = match md.get(FINGERPRINT).and_then(|v| v.to_str().ok()) {
        Some(f) => f.to_string(),
        None => fingerprint(path, &message()),
    };
    let retention = md
        .get(RETENTION_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(DEFAULT_RETENTION, Duration::from_millis)
        // A call made straight to the pattern is not checked by the proxy.
        .clamp(MIN_RETENTION, MAX_RETENTION);
    Ok(Some(Once {
        key: key.to_string(),
        fingerprint,
        retention,
    }))
}

/// The answer for an [`Outcome`]: the value, and whether it is a replay.
pub(crate) fn settle<T>(outcome: Outcome<T>, key: &str) -> Result<(T, bool), Error> {
    match outcome {
        Outcome::Executed(v) => Ok((v, false)),
        Outcome::Replayed(v) => Ok((v, true)),
        Outcome::Reused => Err(Error::IdempotencyKeyReused(format!(
            "idempotency key {key:?} was used before for a different request; use a new key for a new write"
        ))),
        Outcome::InUse => Err(Error::IdempotencyKeyInUse(format!(
            "a call with idempotency key {key:?} is still running; retry after it ends to get its result"
        ))),
    }
}

/// Refuses a key for a pattern that cannot keep the promise.
pub fn unsupported(pattern: &str) -> Error {
    Error::failed_precondition(format!(
        "pattern {pattern:?} cannot honour idempotency keys (it cannot record a key atomically with the write); send the write without `idempotency-key`, or route the namespace to a pattern that can (memstore, trellis-redis, trellis-postgres)"
    ))
}

/// Marks a response as a replay.
pub(crate) fn mark_replayed<T>(response: &mut tonic::Response<T>) {
    response.metadata_mut().insert(
        REPLAYED,
        tonic::metadata::MetadataValue::from_static("true"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_gives_the_once() {
        let mut md = MetadataMap::new();
        assert_eq!(from_metadata(&md, "/p", Vec::new).unwrap(), None);
        md.insert(KEY, "k1".parse().unwrap());
        let once = from_metadata(&md, "/p", || b"m".to_vec()).unwrap().unwrap();
        assert_eq!(once.fingerprint, fingerprint("/p", b"m"));
        assert_eq!(once.retention, DEFAULT_RETENTION);
        md.insert(FINGERPRINT, "abc".parse().unwrap());
        md.insert(RETENTION_MS, "1500".parse().unwrap());
        let once = from_metadata(&md, "/p", Vec::new).unwrap().unwrap();
        assert_eq!(once.fingerprint, "abc");
        assert_eq!(once.retention, Duration::from_millis(1500));
    }
}
