//! The rules a data request must keep, in one place: pattern-sdk's
//! `validate` enforces them (every Rust pattern checks each request with it
//! before its code runs), and the proxy's HTTP gateway publishes them in
//! `/openapi.json` through [`schema`]. A rule changed here changes both.
//!
//! Sizes are in bytes of UTF-8. JSON Schema's `maxLength` counts characters,
//! so for a string that may hold non-ASCII text the published `maxLength` is
//! the byte limit: exact for ASCII, and a string of that many characters
//! that is longer in bytes is still refused (the description says so).

use serde_json::{Value, json};

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest value, in bytes (1 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// The page size used when a `List` request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page a `List` returns; bigger requests are capped to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// A `List` page stops growing once its keys and values pass this many bytes
/// (it always holds at least one entry), so a page fits gRPC's default
/// 4 MiB message limit even with [`MAX_PAGE_SIZE`] values of
/// [`MAX_VALUE_BYTES`]. Every pattern's `list` must honour it; the
/// conformance kit's `list_large_values` check holds them to it.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;
/// The longest TTL: the range of `google.protobuf.Duration` (10,000 years).
pub const MAX_TTL_SECONDS: i64 = 315_576_000_000;

/// The longest topic or queue group, in bytes.
pub const MAX_TOPIC_BYTES: usize = 256;
/// The characters allowed in topics and queue groups, as said in errors.
pub const NAME_CHARS: &str = "ASCII letters, digits, '.', '_', '-' and '~'";
/// [`NAME_CHARS`] as a regular-expression class (inside `[…]`).
pub const NAME_CLASS: &str = "A-Za-z0-9._~-";
/// The largest message payload, in bytes (1 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// The most attributes on one message.
pub const MAX_ATTRIBUTES: usize = 64;
/// The longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 128;
/// The characters allowed in attribute keys, as said in errors.
pub const ATTRIBUTE_KEY_CHARS: &str = "ASCII letters, digits, '.', '_' and '-'";
/// [`ATTRIBUTE_KEY_CHARS`] as a regular-expression class (inside `[…]`).
pub const ATTRIBUTE_KEY_CLASS: &str = "A-Za-z0-9._-";
/// Attribute keys starting with this (in any case) are reserved for Trellis
/// and its patterns, e.g. for the message id a backend carries in a header.
pub const RESERVED_ATTRIBUTE_PREFIX: &str = "trellis-";
/// The longest attribute value, in bytes of UTF-8.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;
/// The most bytes of attribute keys and values on one message (64 KiB).
pub const MAX_ATTRIBUTES_BYTES: usize = 64 * 1024;

/// Is `c` allowed in a topic or queue group ([`NAME_CHARS`])?
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '~')
}

/// Is `c` allowed in an attribute key ([`ATTRIBUTE_KEY_CHARS`])?
pub fn is_attribute_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// The JSON Schema (2020-12, as OpenAPI 3.1 has it) constraints on `field` of the data
/// request `message` (full name, e.g. `trellis.data.v1.PutRequest`), or
/// `None` when the field has no rule beyond its type. The gateway merges
/// them into the field's type schema.
pub fn schema(message: &str, field: &str) -> Option<Value> {
    let kind = message.strip_prefix("trellis.data.v1.")?;
    Some(match (kind, field) {
        (k, "namespace") if k.ends_with("Request") => json!({
            "minLength": 1,
            "description": "A namespace configured in the proxy."
        }),
        ("GetRequest" | "PutRequest" | "DeleteRequest", "key") => json!({
            "minLength": 1,
            "maxLength": MAX_KEY_BYTES,
            "pattern": "^[^\\u0000]*$",
            "description": format!("1 to {MAX_KEY_BYTES} bytes of UTF-8, no NUL.")
        }),
        ("PutRequest", "value") => json!({
            "maxLength": base64_len(MAX_VALUE_BYTES),
            "description": format!("At most {MAX_VALUE_BYTES} bytes (1 MiB), base64.")
        }),
        ("PutRequest", "ttl") => json!({
            "pattern": ttl_pattern(),
            "description": format!(
                "How long the key lives, in seconds with up to 9 decimals and an `s`, e.g. `30s` \
                 or `1.5s`; absent or `0s`: it never expires; at most {MAX_TTL_SECONDS}s."
            )
        }),
        ("ListRequest", "page_size") => json!({
            "minimum": 0,
            "description": format!(
                "0: the default of {DEFAULT_PAGE_SIZE}; more than {MAX_PAGE_SIZE} is capped to \
                 {MAX_PAGE_SIZE}; negative is refused."
            )
        }),
        ("ListRequest", "page_token") => json!({
            "description": "The `nextPageToken` of the previous page, unchanged; empty for the \
                            first page. Tokens are opaque and made by the pattern: any other \
                            value is refused (400)."
        }),
        ("PublishRequest" | "SubscribeRequest", "topic") => json!({
            "pattern": format!("^[{NAME_CLASS}]{{1,{MAX_TOPIC_BYTES}}}$"),
            "description": format!("1 to {MAX_TOPIC_BYTES} of {NAME_CHARS}.")
        }),
        ("SubscribeRequest", "queue_group") => json!({
            "pattern": format!("^[{NAME_CLASS}]{{0,{MAX_TOPIC_BYTES}}}$"),
            "description": format!(
                "Empty: every subscriber gets every message; else up to {MAX_TOPIC_BYTES} of \
                 {NAME_CHARS}, and each message goes to one subscriber of the group."
            )
        }),
        ("PublishRequest", "payload") => json!({
            "maxLength": base64_len(MAX_PAYLOAD_BYTES),
            "description": format!("At most {MAX_PAYLOAD_BYTES} bytes (1 MiB), base64.")
        }),
        ("PublishRequest", "attributes") => json!({
            "maxProperties": MAX_ATTRIBUTES,
            "propertyNames": {
                "pattern": format!("^[{ATTRIBUTE_KEY_CLASS}]{{1,{MAX_ATTRIBUTE_KEY_BYTES}}}$"),
                "not": {"pattern": format!("^{}", any_case(RESERVED_ATTRIBUTE_PREFIX))}
            },
            "additionalProperties": {
                "type": "string",
                "maxLength": MAX_ATTRIBUTE_VALUE_BYTES,
                "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
            },
            "description": format!(
                "At most {MAX_ATTRIBUTES} entries; keys 1 to {MAX_ATTRIBUTE_KEY_BYTES} of \
                 {ATTRIBUTE_KEY_CHARS}, not starting with {RESERVED_ATTRIBUTE_PREFIX:?} in any \
                 case; values at most {MAX_ATTRIBUTE_VALUE_BYTES} bytes, no control characters; \
                 keys and values together at most {MAX_ATTRIBUTES_BYTES} bytes."
            )
        }),
        _ => return None,
    })
}

/// The length of `bytes` bytes in padded base64.
fn base64_len(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4
}

/// `trellis-` → `[Tt][Rr]…-`: a case-insensitive prefix without the `(?i)`
/// flag, which JSON Schema's ECMA-262 patterns do not have.
fn any_case(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphabetic() {
                format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase())
            } else {
                regex_escape(c)
            }
        })
        .collect()
}

fn regex_escape(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\{c}")
    }
}

/// Every TTL a `Put` accepts, as the JSON mapping spells a
/// `google.protobuf.Duration` (prost's parser: optional `-`, digits, an
/// optional `.` and digits, `s`): zero (even as `-0s`), or a positive
/// number of seconds up to [`MAX_TTL_SECONDS`] (leading zeros allowed, any
/// fraction, as only whole seconds are bounded).
pub fn ttl_pattern() -> String {
    let max = u64::try_from(MAX_TTL_SECONDS).unwrap_or(u64::MAX);
    format!("^(-0+(\\.0+)?|0*({})(\\.[0-9]+)?)s$", at_most(max))
}

/// A regular expression (no anchors, no leading zeros) for the decimal
/// integers 0 to `n`: `0|[1-9][0-9]{0,k}` for the shorter numbers, then for
/// each digit of `n` the numbers that share its prefix and are lower there.
fn at_most(n: u64) -> String {
    let digits: Vec<u32> = n
        .to_string()
        .chars()
        .filter_map(|c| c.to_digit(10))
        .collect();
    let len = digits.len();
    let mut alts = vec!["0".to_string()];
    if len > 1 {
        alts.push(format!("[1-9][0-9]{{0,{}}}", len - 2));
    }
    for (i, &d) in digits.iter().enumerate() {
        let low = if i == 0 { 1 } else { 0 };
        if d > low {
            let prefix: String = digits[..i].iter().map(|d| d.to_string()).collect();
            let rest = len - i - 1;
            let class = if d - 1 == low {
                low.to_string()
            } else {
                format!("[{low}-{}]", d - 1)
            };
            alts.push(match rest {
                0 => format!("{prefix}{class}"),
                r => format!("{prefix}{class}[0-9]{{{r}}}"),
            });
        }
    }
    if len > 1 || n > 0 {
        alts.push(n.to_string());
    }
    alts.dedup();
    alts.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchored(re: &str) -> regex::Regex {
        regex::Regex::new(&format!("^({re})$")).unwrap()
    }

    #[test]
    fn at_most_matches_exactly_the_numbers_up_to_n() {
        for n in [0u64, 1, 9, 10, 99, 100, 315, 1000, 40_506, 315_576_000_000] {
            let re = anchored(&at_most(n));
            let probes = (0..2000u64).chain([n.saturating_sub(1), n, n + 1, n * 10, n + 10]);
            for k in probes {
                assert_eq!(re.is_match(&k.to_string()), k <= n, "n={n} k={k}: {re}");
            }
            assert!(!re.is_match("01"), "no leading zeros: {re}");
        }
        // Around every digit of the real limit.
        let re = anchored(&at_most(315_576_000_000));
        for k in [
            315_575_999_999u64,
            315_576_000_001,
            315_580_000_000,
            299_999_999_999,
            316_000_000_000,
            99_999_999_999,
            400_000_000_000,
        ] {
            assert_eq!(re.is_match(&k.to_string()), k <= 315_576_000_000, "{k}");
        }
    }

    #[test]
    fn the_ttl_pattern_agrees_with_the_duration_parser_and_the_limit() {
        let re = regex::Regex::new(&ttl_pattern()).unwrap();
        let accepted = |s: &str| {
            s.parse::<prost_types::Duration>().is_ok_and(|d| {
                let d = {
                    let mut d = d;
                    d.normalize();
                    d
                };
                d.seconds >= 0 && d.nanos >= 0 && d.seconds <= MAX_TTL_SECONDS
            })
        };
        for s in [
            "0s",
            "-0s",
            "-0.000s",
            "30s",
            "1.5s",
            "0.000000001s",
            "1.0000000001s",
            "007s",
            "315576000000s",
            "315576000000.9s",
            "315576000001s",
            "999999999999s",
            "-1s",
            "-0.5s",
            "1.s",
            ".5s",
            "5",
            "5m",
            "s",
            "+5s",
            " 5s",
            "1e3s",
        ] {
            assert_eq!(re.is_match(s), accepted(s), "{s:?}");
        }
    }

    #[test]
    fn every_data_field_with_a_rule_exists() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let mut seen = 0;
        for file in set.file.iter().filter(|f| f.package() == "trellis.data.v1") {
            for m in &file.message_type {
                for f in &m.field {
                    if schema(&format!("trellis.data.v1.{}", m.name()), f.name()).is_some() {
                        seen += 1;
                    }
                }
            }
        }
        // namespace ×6, key ×3, value, ttl, page_size, page_token, topic ×2,
        // queue_group, payload, attributes: a rule for a renamed field
        // would silently describe nothing.
        assert_eq!(seen, 18);
    }

    #[test]
    fn patterns_compile_and_say_what_they_mean() {
        for (m, f) in [
            ("PublishRequest", "topic"),
            ("SubscribeRequest", "queue_group"),
            ("GetRequest", "key"),
        ] {
            let s = schema(&format!("trellis.data.v1.{m}"), f).unwrap();
            regex::Regex::new(s["pattern"].as_str().unwrap()).unwrap();
        }
        let attrs = schema("trellis.data.v1.PublishRequest", "attributes").unwrap();
        let reserved =
            regex::Regex::new(attrs["propertyNames"]["not"]["pattern"].as_str().unwrap()).unwrap();
        assert!(reserved.is_match("TRELLIS-id") && reserved.is_match("trellis-x"));
        assert!(!reserved.is_match("trellis_x"));
        let control =
            regex::Regex::new(attrs["additionalProperties"]["pattern"].as_str().unwrap()).unwrap();
        assert!(control.is_match("plain value é"));
        assert!(!control.is_match("a\u{7}b") && !control.is_match("a\u{85}b"));
    }
}
