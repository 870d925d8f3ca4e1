//! Header mapping between HTTP and gRPC metadata.
//!
//! Built in, always: `X-Request-ID` is accepted (if it is 1–128 visible
//! ASCII characters) or generated, sent to the pattern as `x-request-id`
//! metadata and echoed on the response; W3C `traceparent`/`tracestate` pass
//! through; `Authorization` passes through but is never logged;
//! `X-Client-Id` passes through for the traffic policies; `Idempotency-Key`
//! (a structured-field string or a bare token) becomes `idempotency-key`
//! metadata, and `idempotent-replayed` comes back as a header. Configured
//! rules (`http.headers`) add more, with defaults and simple transforms.
//! Hop-by-hop headers are never forwarded.

use http::HeaderMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

use crate::config::{HeaderMapping, HeaderRule};

pub use crate::metadata::{REQUEST_ID, is_hop_by_hop, request_id};
/// Passed as they are: trace context, credentials, and what the traffic
/// policies read (the default `rate_limit.caller_key`, the idempotency key).
const PASS_THROUGH: &[&str] = &["traceparent", "tracestate", "authorization", "x-client-id"];

/// Response metadata passed on as headers (`idempotent-replayed`).
const PASS_BACK: &[&str] = &[trellis_proto::idempotency::REPLAYED];

/// The key of an `Idempotency-Key` header: the IETF draft's structured
/// string (`"8e0f…"`, quotes and `\` escapes undone), or a bare token.
/// `None` for a malformed string (the data plane then refuses the call).
pub fn idempotency_key(value: &str) -> Option<String> {
    let v = value.trim();
    let Some(inner) = v.strip_prefix('"') else {
        return Some(v.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// The trace id of the request's W3C `traceparent`, if it has a valid one.
pub fn trace_id(headers: &HeaderMap) -> Option<String> {
    let tp = headers.get("traceparent")?.to_str().ok()?;
    crate::metadata::trace_id(tp).map(str::to_string)
}

fn apply(rule: &HeaderRule, value: Option<&str>) -> Option<String> {
    let mut v = value.map(str::to_string).or_else(|| rule.default.clone())?;
    if rule.trim {
        v = v.trim().to_string();
    }
    if let Some(p) = &rule.strip_prefix
        && let Some(rest) = v.strip_prefix(p.as_str())
    {
        v = rest.to_string();
    }
    Some(v)
}

/// The gRPC metadata for one HTTP request.
pub fn to_metadata(
    headers: &HeaderMap,
    request_id: &str,
    path: &str,
    rules: &HeaderMapping,
) -> MetadataMap {
    let mut md = MetadataMap::new();
    if let Ok(v) = MetadataValue::try_from(request_id) {
        md.insert(REQUEST_ID, v);
    }
    for name in PASS_THROUGH {
        if let Some(v) = headers.get(*name).and_then(|v| v.to_str().ok())
            && let Ok(v) = MetadataValue::try_from(v)
        {
            md.insert(*name, v);
        }
    }
    if let Some(key) = headers
        .get(trellis_proto::idempotency::KEY)
        .and_then(|v| v.to_str().ok())
    {
        // A malformed one was refused before this (gateway::dispatch).
        let key = idempotency_key(key).unwrap_or_else(|| key.to_string());
        if let Ok(v) = MetadataValue::try_from(key.as_str()) {
            md.insert(trellis_proto::idempotency::KEY, v);
        }
    }
    if rules.skip_paths.iter().any(|p| p == path) {
        return md;
    }
    for rule in &rules.request {
        let value = headers
            .get(rule.from.as_str())
            .and_then(|v| v.to_str().ok());
        if let Some(v) = apply(rule, value)
            && let (Ok(k), Ok(v)) = (
                MetadataKey::from_bytes(rule.to.to_ascii_lowercase().as_bytes()),
                MetadataValue::try_from(v.as_str()),
            )
        {
            md.insert(k, v);
        }
    }
    md
}

/// Response headers from the gRPC response metadata.
pub fn from_metadata(md: &MetadataMap, path: &str, rules: &HeaderMapping, out: &mut HeaderMap) {
    for name in PASS_BACK {
        if let Some(v) = md.get(*name).and_then(|v| v.to_str().ok())
            && let Ok(v) = http::HeaderValue::from_str(v)
        {
            out.insert(*name, v);
        }
    }
    if rules.skip_paths.iter().any(|p| p == path) {
        return;
    }
    for rule in &rules.response {
        let value = md
            .get(rule.from.to_ascii_lowercase().as_str())
            .and_then(|v| v.to_str().ok());
        if let Some(v) = apply(rule, value)
            && let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(rule.to.as_bytes()),
                http::HeaderValue::from_str(&v),
            )
        {
            out.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_structured_strings_or_tokens() {
        assert_eq!(idempotency_key("\"8e0f-a\"").as_deref(), Some("8e0f-a"));
        assert_eq!(idempotency_key("\"a\\\"b\"").as_deref(), Some("a\"b"));
        assert_eq!(
            idempotency_key("plain-token").as_deref(),
            Some("plain-token")
        );
        assert_eq!(idempotency_key("\"open"), None);
        assert_eq!(idempotency_key("\"a\"b\""), None);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn trace_id_comes_from_traceparent() {
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id(&headers(&[("traceparent", "garbage")])), None);
    }

    #[test]
    fn rules_map_default_and_transform() {
        let rules = HeaderMapping {
            request: vec![
                HeaderRule {
                    from: "Authorization".into(),
                    to: "x-token".into(),
                    default: None,
                    strip_prefix: Some("Bearer ".into()),
                    trim: true,
                },
                HeaderRule {
                    from: "X-Tenant".into(),
                    to: "tenant".into(),
                    default: Some("public".into()),
                    strip_prefix: None,
                    trim: false,
                },
            ],
            response: vec![],
            skip_paths: vec!["/skip".into()],
        };
        let h = headers(&[
            ("authorization", " Bearer s3cret "),
            ("connection", "close"),
        ]);
        let md = to_metadata(&h, "rid", "/v1/x", &rules);
        assert_eq!(md.get("x-token").unwrap(), "s3cret");
        assert_eq!(md.get("tenant").unwrap(), "public");
        assert_eq!(md.get("x-request-id").unwrap(), "rid");
        assert_eq!(md.get("authorization").unwrap(), " Bearer s3cret ");
        assert!(md.get("connection").is_none(), "hop-by-hop never forwarded");
        let skipped = to_metadata(&h, "rid", "/skip", &rules);
        assert!(skipped.get("tenant").is_none());
    }
}
