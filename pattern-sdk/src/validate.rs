//! The checks every data request passes, once, before any pattern sees it.
//! The rules themselves (limits, alphabets) are `trellis_proto::rules`,
//! which the proxy's OpenAPI document publishes.
//! Each function reports every violation it finds, not just the first.
//!
//! | field | rule |
//! |-------|------|
//! | `namespace` | not empty |
//! | `key` | not empty, at most [`MAX_KEY_BYTES`] bytes, no NUL |
//! | `value` | at most [`MAX_VALUE_BYTES`] bytes |
//! | `ttl` | absent or zero: never expires; negative: rejected; at most [`MAX_TTL_SECONDS`] |
//! | `page_size` | negative: rejected; 0: [`DEFAULT_PAGE_SIZE`]; capped at [`MAX_PAGE_SIZE`] |
//!
//! A `List` page also ends early once it holds [`MAX_PAGE_BYTES`] of keys and
//! values; that is the pattern's job, not a request check.
//!
//! Pub/sub (`Publish`, `Subscribe`):
//!
//! | field | rule |
//! |-------|------|
//! | `namespace` | not empty |
//! | `topic` | 1 to [`MAX_TOPIC_BYTES`] bytes of [`NAME_CHARS`] |
//! | `queue_group` | empty: none (fan-out); otherwise like `topic` |
//! | `payload` | at most [`MAX_PAYLOAD_BYTES`] bytes |
//! | `attributes` | at most [`MAX_ATTRIBUTES`] entries; keys 1 to [`MAX_ATTRIBUTE_KEY_BYTES`] bytes of [`ATTRIBUTE_KEY_CHARS`], not starting with [`RESERVED_ATTRIBUTE_PREFIX`] (any case); values at most [`MAX_ATTRIBUTE_VALUE_BYTES`] bytes, no control characters; keys and values together at most [`MAX_ATTRIBUTES_BYTES`] bytes |
//!
//! The topic alphabet is RFC 3986's unreserved set, so a topic sits in a URL
//! path without escaping, and backends (NATS subjects, Redis channels, Kafka
//! topic names) can carry it with a simple escaping. Attribute keys are valid
//! header names for every backend (NATS headers, HTTP).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use trellis_proto::data::v1::{
    DeleteRequest, GetRequest, ListRequest, PublishRequest, PutRequest, SubscribeRequest,
};

use crate::error::FieldViolation;
use crate::{Error, ListQuery};

// The limits and alphabets live with the contracts, where the proxy's
// OpenAPI document reads them too.
pub use trellis_proto::rules::{
    ATTRIBUTE_KEY_CHARS, DEFAULT_PAGE_SIZE, MAX_ATTRIBUTE_KEY_BYTES, MAX_ATTRIBUTE_VALUE_BYTES,
    MAX_ATTRIBUTES, MAX_ATTRIBUTES_BYTES, MAX_KEY_BYTES, MAX_PAGE_BYTES, MAX_PAGE_SIZE,
    MAX_PAYLOAD_BYTES, MAX_TOPIC_BYTES, MAX_TTL_SECONDS, MAX_VALUE_BYTES, NAME_CHARS,
    RESERVED_ATTRIBUTE_PREFIX, is_attribute_key_char, is_name_char,
};

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

/// A valid `Publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishArgs {
    pub namespace: String,
    pub topic: String,
    pub payload: Bytes,
    pub attributes: BTreeMap<String, String>,
}

/// A valid `Subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeArgs {
    pub namespace: String,
    pub topic: String,
    /// `None`: fan-out.
    pub queue_group: Option<String>,
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

pub fn publish(req: PublishRequest) -> Result<PublishArgs, Error> {
    let mut v = Violations::default();
    v.namespace(&req.namespace);
    v.name("topic", &req.topic);
    v.payload(&req.payload);
    v.attributes(&req.attributes);
    v.finish()?;
    Ok(PublishArgs {
        namespace: req.namespace,
        topic: req.topic,
        payload: Bytes::from(req.payload),
        attributes: req.attributes.into_iter().collect(),
    })
}

pub fn subscribe(req: SubscribeRequest) -> Result<SubscribeArgs, Error> {
    let mut v = Violations::default();
    v.namespace(&req.namespace);
    v.name("topic", &req.topic);
    if !req.queue_group.is_empty() {
        v.name("queue_group", &req.queue_group);
    }
    v.finish()?;
    Ok(SubscribeArgs {
        namespace: req.namespace,
        topic: req.topic,
        queue_group: Some(req.queue_group).filter(|g| !g.is_empty()),
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

    /// A topic or queue group.
    fn name(&mut self, field: &str, name: &str) {
        if name.is_empty() {
            self.add(
                field,
                format!("must not be empty; use 1 to {MAX_TOPIC_BYTES} bytes of {NAME_CHARS}"),
            );
            return;
        }
        if name.len() > MAX_TOPIC_BYTES {
            self.add(
                field,
                format!(
                    "is {} bytes long, the limit is {MAX_TOPIC_BYTES} bytes; use a shorter name",
                    name.len()
                ),
            );
        }
        if let Some((at, c)) = name.char_indices().find(|(_, c)| !is_name_char(*c)) {
            self.add(
                field,
                format!("contains {c:?} at byte {at}; only {NAME_CHARS} are allowed"),
            );
        }
    }

    fn payload(&mut self, payload: &[u8]) {
        if payload.len() > MAX_PAYLOAD_BYTES {
            self.add(
                "payload",
                format!(
                    "is {} bytes, the limit is {MAX_PAYLOAD_BYTES} bytes (1 MiB); \
                     put large objects in a store and publish a reference",
                    payload.len()
                ),
            );
        }
    }

    fn attributes(&mut self, attributes: &HashMap<String, String>) {
        if attributes.len() > MAX_ATTRIBUTES {
            self.add(
                "attributes",
                format!(
                    "has {} entries, the limit is {MAX_ATTRIBUTES}; move the rest into the payload",
                    attributes.len()
                ),
            );
        }
        let total: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > MAX_ATTRIBUTES_BYTES {
            self.add(
                "attributes",
                format!(
                    "keys and values add up to {total} bytes, the limit is \
                     {MAX_ATTRIBUTES_BYTES} bytes (64 KiB); move data into the payload"
                ),
            );
        }
        // Sorted, so the violations come out in a stable order.
        let sorted: BTreeMap<&String, &String> = attributes.iter().collect();
        for (key, value) in sorted {
            let field = format!("attributes[{key:?}]");
            if key.is_empty() {
                self.add(
                    "attributes",
                    "has an empty key; keys must not be empty".into(),
                );
            }
            if key.len() > MAX_ATTRIBUTE_KEY_BYTES {
                self.add(
                    &field,
                    format!(
                        "key is {} bytes long, the limit is {MAX_ATTRIBUTE_KEY_BYTES} bytes",
                        key.len()
                    ),
                );
            }
            if let Some((at, c)) = key.char_indices().find(|(_, c)| !is_attribute_key_char(*c)) {
                self.add(
                    &field,
                    format!(
                        "key contains {c:?} at byte {at}; only {ATTRIBUTE_KEY_CHARS} are allowed"
                    ),
                );
            }
            if key
                .get(..RESERVED_ATTRIBUTE_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_ATTRIBUTE_PREFIX))
            {
                self.add(
                    &field,
                    format!(
                        "keys starting with {RESERVED_ATTRIBUTE_PREFIX:?} are reserved for \
                         Trellis; rename the attribute"
                    ),
                );
            }
            if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                self.add(
                    &field,
                    format!(
                        "value is {} bytes, the limit is {MAX_ATTRIBUTE_VALUE_BYTES} bytes; \
                         move it into the payload",
                        value.len()
                    ),
                );
            }
            if let Some((at, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
                self.add(
                    &field,
                    format!(
                        "value contains the control character {c:?} at byte {at}; \
                         attributes travel as headers, so encode it (e.g. base64) or \
                         move it into the payload"
                    ),
                );
            }
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

    fn publish_req(topic: &str, attributes: &[(&str, &str)]) -> PublishRequest {
        PublishRequest {
            namespace: "ns".into(),
            topic: topic.into(),
            payload: b"hi".to_vec(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn subscribe_req(topic: &str, queue_group: &str) -> SubscribeRequest {
        SubscribeRequest {
            namespace: "ns".into(),
            topic: topic.into(),
            queue_group: queue_group.into(),
        }
    }

    #[test]
    fn valid_publish_passes_through() {
        let args = publish(publish_req("orders.created~v1", &[("trace-id", "abc é")])).unwrap();
        assert_eq!(args.topic, "orders.created~v1");
        assert_eq!(args.payload, Bytes::from_static(b"hi"));
        assert_eq!(args.attributes["trace-id"], "abc é");
    }

    #[test]
    fn topic_rules() {
        assert_eq!(
            fields(publish(publish_req("", &[])).unwrap_err()),
            ["topic"]
        );
        let ok = "t".repeat(MAX_TOPIC_BYTES);
        assert!(publish(publish_req(&ok, &[])).is_ok());
        let long = "t".repeat(MAX_TOPIC_BYTES + 1);
        let v = violations(publish(publish_req(&long, &[])).unwrap_err());
        assert_eq!(v[0].field, "topic");
        assert!(v[0].message.contains("257 bytes"), "{}", v[0].message);
        for bad in ["a b", "a/b", "a*", "a>", "a:b", "é", "a\0"] {
            let v = violations(publish(publish_req(bad, &[])).unwrap_err());
            assert_eq!(v[0].field, "topic", "{bad:?}");
            assert!(
                v[0].message.contains("only ASCII letters"),
                "{}",
                v[0].message
            );
        }
    }

    #[test]
    fn queue_group_is_optional_and_checked_like_a_topic() {
        let args = subscribe(subscribe_req("t", "")).unwrap();
        assert_eq!(args.queue_group, None);
        let args = subscribe(subscribe_req("t", "workers")).unwrap();
        assert_eq!(args.queue_group.as_deref(), Some("workers"));
        let err = subscribe(SubscribeRequest {
            namespace: String::new(),
            topic: String::new(),
            queue_group: "no spaces".into(),
        })
        .unwrap_err();
        assert_eq!(fields(err), ["namespace", "topic", "queue_group"]);
    }

    #[test]
    fn payload_limit_is_inclusive() {
        let mut req = publish_req("t", &[]);
        req.payload = vec![0; MAX_PAYLOAD_BYTES];
        assert!(publish(req.clone()).is_ok());
        req.payload.push(0);
        let v = violations(publish(req).unwrap_err());
        assert_eq!(v[0].field, "payload");
        assert!(v[0].message.contains("1 MiB"));
    }

    #[test]
    fn attribute_rules() {
        let long_key = "k".repeat(MAX_ATTRIBUTE_KEY_BYTES + 1);
        let long_value = "v".repeat(MAX_ATTRIBUTE_VALUE_BYTES + 1);
        let cases: &[(&str, &str, &str)] = &[
            ("", "v", "empty key"),
            (&long_key, "v", "129 bytes"),
            ("a:b", "v", "only ASCII letters"),
            ("Trellis-Message-Id", "v", "reserved"),
            ("ok", &long_value, "4097 bytes"),
            ("ok", "line\nbreak", "control character"),
        ];
        for (key, value, want) in cases {
            let v = violations(publish(publish_req("t", &[(key, value)])).unwrap_err());
            assert!(v[0].field.starts_with("attributes"), "{v:?}");
            assert!(v[0].message.contains(want), "{key:?}: {}", v[0].message);
        }
        let ok_key = "k".repeat(MAX_ATTRIBUTE_KEY_BYTES);
        let ok_value = "v".repeat(MAX_ATTRIBUTE_VALUE_BYTES);
        assert!(publish(publish_req("t", &[(&ok_key, &ok_value)])).is_ok());
    }

    #[test]
    fn attribute_count_and_total_size_are_limited() {
        let many: Vec<(String, String)> = (0..=MAX_ATTRIBUTES)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        let mut req = publish_req("t", &[]);
        req.attributes = many.iter().cloned().collect();
        let v = violations(publish(req.clone()).unwrap_err());
        assert_eq!(v[0].field, "attributes");
        assert!(v[0].message.contains("65 entries"), "{}", v[0].message);
        req.attributes.remove("k0");
        assert!(publish(req).is_ok());

        // 17 values of 4000 bytes: each within its limit, together too many.
        let mut req = publish_req("t", &[]);
        req.attributes = (0..17)
            .map(|i| (format!("k{i}"), "v".repeat(4000)))
            .collect();
        let v = violations(publish(req).unwrap_err());
        assert_eq!(v.len(), 1);
        assert!(v[0].message.contains("64 KiB"), "{}", v[0].message);
    }
}
