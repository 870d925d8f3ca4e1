//! The checks every data request passes, once, before any pattern sees it.
//! Each function reports every violation it finds, not just the first.
//!
//! | field | rule |
//! |-------|------|
//! | `namespace` | not empty |
//! | `key` | not empty, at most [`MAX_KEY_BYTES`] bytes, no NUL |
//! | `value` | at most [`MAX_VALUE_BYTES`] bytes |
//! | `ttl` | absent or zero: never expires; negative: rejected; at most [`MAX_TTL_SECONDS`] |
//! | `page_size` | negative: rejected; 0: [`DEFAULT_PAGE_SIZE`]; capped at [`MAX_PAGE_SIZE`] |

use std::time::Duration;

use bytes::Bytes;
use trellis_proto::data::v1::{DeleteRequest, GetRequest, ListRequest, PutRequest};

use crate::error::FieldViolation;
use crate::{Error, ListQuery};

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value, in bytes (1 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The page size used when a `List` request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page a `List` returns; bigger requests are capped to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// The longest TTL: the range of `google.protobuf.Duration` (10,000 years).
pub const MAX_TTL_SECONDS: i64 = 315_576_000_000;

/// A valid `Get` or `Delete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyArgs {
    pub namespace: String,
    pub key: String,
}

/// A valid `Put`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutArgs {
    pub namespace: String,
    pub key: String,
    pub value: Bytes,
    /// `None`: never expires.
    pub ttl: Option<Duration>,
}

/// A valid `List`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListArgs {
    pub namespace: String,
    pub query: ListQuery,
}

pub fn get(req: GetRequest) -> Result<KeyArgs, Error> {
    key_args(req.namespace, req.key)
}

pub fn delete(req: DeleteRequest) -> Result<KeyArgs, Error> {
    key_args(req.namespace, req.key)
}

pub fn put(req: PutRequest) -> Result<PutArgs, Error> {
    let mut v = Violations::default();
    v.namespace(&req.namespace);
    v.key(&req.key);
    v.value(&req.value);
    let ttl = v.ttl(req.ttl.as_ref());
    v.finish()?;
    Ok(PutArgs {
        namespace: req.namespace,
        key: req.key,
        value: Bytes::from(req.value),
        ttl,
    })
}

pub fn list(req: ListRequest) -> Result<ListArgs, Error> {
    let mut v = Violations::default();
    v.namespace(&req.namespace);
    let page_size = v.page_size(req.page_size);
    v.finish()?;
    Ok(ListArgs {
        namespace: req.namespace,
        query: ListQuery {
            prefix: req.prefix,
            page_size,
            page_token: Some(req.page_token).filter(|t| !t.is_empty()),
        },
    })
}

fn key_args(namespace: String, key: String) -> Result<KeyArgs, Error> {
    let mut v = Violations::default();
    v.namespace(&namespace);
    v.key(&key);
    v.finish()?;
    Ok(KeyArgs { namespace, key })
}

/// Collects what is wrong, so a caller learns every problem in one round trip.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn add(&mut self, field: &str, message: String) {
        self.0.push(FieldViolation::new(field, message));
    }

    fn finish(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }

    fn namespace(&mut self, namespace: &str) {
        if namespace.is_empty() {
            self.add(
                "namespace",
                "must not be empty; set it to the namespace configured for this pattern".into(),
            );
        }
    }

    fn key(&mut self, key: &str) {
        if key.is_empty() {
            self.add("key", "must not be empty".into());
        }
        if key.len() > MAX_KEY_BYTES {
            self.add(
                "key",
                format!(
                    "is {} bytes long, the limit is {MAX_KEY_BYTES} bytes; use a shorter key",
                    key.len()
                ),
            );
        }
        if let Some(at) = key.bytes().position(|b| b == 0) {
            self.add(
                "key",
                format!("contains a NUL character at byte {at}; remove it"),
            );
        }
    }

    fn value(&mut self, value: &[u8]) {
        if value.len() > MAX_VALUE_BYTES {
            self.add(
                "value",
                format!(
                    "is {} bytes, the limit is {MAX_VALUE_BYTES} bytes (1 MiB); \
                     store large objects elsewhere and keep a reference here",
                    value.len()
                ),
            );
        }
    }

    /// Absent or zero: `None` (never expires).
    fn ttl(&mut self, ttl: Option<&prost_types::Duration>) -> Option<Duration> {
        let given = ttl?;
        let ttl = given.normalized();
        if ttl.seconds < 0 || ttl.nanos < 0 {
            self.add(
                "ttl",
                format!(
                    "must not be negative (got {}); omit it, or send 0, \
                     for a key that never expires",
                    seconds(given)
                ),
            );
            return None;
        }
        if ttl.seconds > MAX_TTL_SECONDS {
            self.add(
                "ttl",
                format!(
                    "is {}, longer than the limit of {MAX_TTL_SECONDS}s (10,000 years); \
                     omit it for a key that never expires",
                    seconds(given)
                ),
            );
            return None;
        }
        // Non-negative and normalized, so this conversion cannot fail.
        let ttl = Duration::try_from(ttl).ok()?;
        (!ttl.is_zero()).then_some(ttl)
    }

    fn page_size(&mut self, page_size: i32) -> usize {
        match usize::try_from(page_size) {
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
            Err(_) => {
                self.add(
                    "page_size",
                    format!(
                        "must not be negative (got {page_size}); send 0 for the default \
                         of {DEFAULT_PAGE_SIZE}, or up to {MAX_PAGE_SIZE}"
                    ),
                );
                DEFAULT_PAGE_SIZE
            }
        }
    }
}

/// Formats any duration without overflow (prost's `Display` overflows on
/// `i64::MIN` seconds).
fn seconds(d: &prost_types::Duration) -> String {
    format!("{}s", d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations(err: Error) -> Vec<FieldViolation> {
        match err {
            Error::InvalidArgument(v) => v,
            other => panic!("want InvalidArgument, got {other:?}"),
        }
    }

    fn fields(err: Error) -> Vec<String> {
        violations(err).into_iter().map(|v| v.field).collect()
    }

    fn put_req(key: &str, value: Vec<u8>, ttl: Option<(i64, i32)>) -> PutRequest {
        PutRequest {
            namespace: "ns".into(),
            key: key.into(),
            value,
            ttl: ttl.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        }
    }

    #[test]
    fn valid_get_passes_through() {
        let args = get(GetRequest {
            namespace: "ns".into(),
            key: "a/b".into(),
        })
        .unwrap();
        assert_eq!(
            args,
            KeyArgs {
                namespace: "ns".into(),
                key: "a/b".into()
            }
        );
    }

    #[test]
    fn empty_namespace_is_rejected() {
        let err = delete(DeleteRequest {
            namespace: String::new(),
            key: "k".into(),
        })
        .unwrap_err();
        let v = violations(err);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "namespace");
        assert!(v[0].message.contains("must not be empty"));
    }

    #[test]
    fn empty_key_is_rejected() {
        let err = get(GetRequest {
            namespace: "ns".into(),
            key: String::new(),
        })
        .unwrap_err();
        assert_eq!(fields(err), ["key"]);
    }

    #[test]
    fn key_length_limit_is_inclusive() {
        let ok = "k".repeat(MAX_KEY_BYTES);
        assert!(put(put_req(&ok, vec![], None)).is_ok());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let v = violations(put(put_req(&long, vec![], None)).unwrap_err());
        assert_eq!(v[0].field, "key");
        assert!(v[0].message.contains("1025 bytes"), "{}", v[0].message);
        assert!(v[0].message.contains("1024"), "{}", v[0].message);
    }

    #[test]
    fn key_length_counts_bytes_not_chars() {
        // 'é' is two bytes in UTF-8: 513 of them are 1026 bytes.
        let key = "é".repeat(513);
        assert_eq!(
            fields(put(put_req(&key, vec![], None)).unwrap_err()),
            ["key"]
        );
    }

    #[test]
    fn nul_in_key_is_rejected() {
        let v = violations(put(put_req("a\0b", vec![], None)).unwrap_err());
        assert_eq!(v[0].field, "key");
        assert!(v[0].message.contains("NUL"));
        assert!(v[0].message.contains("byte 1"));
    }

    #[test]
    fn value_limit_is_inclusive() {
        assert!(put(put_req("k", vec![0; MAX_VALUE_BYTES], None)).is_ok());
        let v = violations(put(put_req("k", vec![0; MAX_VALUE_BYTES + 1], None)).unwrap_err());
        assert_eq!(v[0].field, "value");
        assert!(v[0].message.contains("1 MiB"));
    }

    #[test]
    fn absent_or_zero_ttl_means_no_expiry() {
        assert_eq!(put(put_req("k", vec![], None)).unwrap().ttl, None);
        assert_eq!(put(put_req("k", vec![], Some((0, 0)))).unwrap().ttl, None);
    }

    #[test]
    fn positive_ttl_is_kept() {
        let args = put(put_req("k", vec![], Some((1, 500_000_000)))).unwrap();
        assert_eq!(args.ttl, Some(Duration::from_millis(1500)));
        // Mixed signs normalize: 2s - 1ns is positive.
        let args = put(put_req("k", vec![], Some((2, -1)))).unwrap();
        assert_eq!(args.ttl, Some(Duration::new(1, 999_999_999)));
    }

    #[test]
    fn negative_ttl_is_rejected() {
        for (seconds, nanos) in [(-5, 0), (0, -1), (i64::MIN, 0), (i64::MIN, -999_999_999)] {
            let v = violations(put(put_req("k", vec![], Some((seconds, nanos)))).unwrap_err());
            assert_eq!(v[0].field, "ttl");
            assert!(
                v[0].message.contains("must not be negative"),
                "{}",
                v[0].message
            );
        }
    }

    #[test]
    fn absurd_ttl_is_rejected() {
        let v = violations(put(put_req("k", vec![], Some((i64::MAX, 0)))).unwrap_err());
        assert_eq!(v[0].field, "ttl");
    }

    #[test]
    fn every_violation_is_reported_at_once() {
        let req = PutRequest {
            namespace: String::new(),
            key: String::new(),
            value: vec![0; MAX_VALUE_BYTES + 1],
            ttl: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
        };
        assert_eq!(
            fields(put(req).unwrap_err()),
            ["namespace", "key", "value", "ttl"]
        );
    }

    fn list_req(page_size: i32, page_token: &str) -> ListRequest {
        ListRequest {
            namespace: "ns".into(),
            prefix: "p/".into(),
            page_size,
            page_token: page_token.into(),
        }
    }

    #[test]
    fn page_size_is_defaulted_and_capped() {
        assert_eq!(
            list(list_req(0, "")).unwrap().query.page_size,
            DEFAULT_PAGE_SIZE
        );
        assert_eq!(list(list_req(7, "")).unwrap().query.page_size, 7);
        assert_eq!(list(list_req(1000, "")).unwrap().query.page_size, 1000);
        assert_eq!(
            list(list_req(1001, "")).unwrap().query.page_size,
            MAX_PAGE_SIZE
        );
        assert_eq!(
            list(list_req(i32::MAX, "")).unwrap().query.page_size,
            MAX_PAGE_SIZE
        );
    }

    #[test]
    fn negative_page_size_is_rejected() {
        let v = violations(list(list_req(-1, "")).unwrap_err());
        assert_eq!(v[0].field, "page_size");
        assert!(v[0].message.contains("got -1"));
    }

    #[test]
    fn empty_page_token_is_none() {
        let args = list(list_req(0, "")).unwrap();
        assert_eq!(args.query.page_token, None);
        assert_eq!(args.query.prefix, "p/");
        let args = list(list_req(0, "abc")).unwrap();
        assert_eq!(args.query.page_token.as_deref(), Some("abc"));
    }
}
