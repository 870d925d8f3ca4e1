//! Call metadata rules shared by both front doors (gRPC and the HTTP
//! gateway): which headers never travel to a pattern, and the request id
//! every call carries.
//!
//! - `x-request-id` is kept when it is 1–128 visible ASCII characters and
//!   replaced by a new UUID otherwise, so every call a pattern sees can be
//!   found in the proxy's log and in the client's error.
//! - Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are
//!   never forwarded, nor accepted as mapping targets in the config.
//! - `grpc-*` headers describe one gRPC hop (timeout, encodings, previous
//!   attempts): the proxy writes its own for the hop to the pattern.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID: &str = "x-request-id";

/// Connection-specific headers: never forwarded, in either direction.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a request id from a client is usable as it is.
pub fn is_valid_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 128 && id.iter().all(u8::is_ascii_graphic)
}

/// The request's id: the client's `x-request-id` when usable, else a new UUID.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .filter(|v| is_valid_request_id(v.as_bytes()))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Turns a client's gRPC request headers into the ones sent to the pattern,
/// in place: hop-by-hop, `host` and every `grpc-*` header removed, `te:
/// trailers` (which gRPC requires on HTTP/2) set, and a valid
/// `x-request-id` ensured. Everything else — authorization, trace context,
/// custom and binary (`-bin`) metadata, `content-type`, `user-agent` —
/// passes unchanged.
pub fn prepare_for_pattern(headers: &mut HeaderMap) {
    // Usually nothing to drop: then nothing is allocated.
    let drop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !forwarded(name))
        .cloned()
        .collect();
    for name in drop {
        headers.remove(name);
    }
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    match headers.get_mut(REQUEST_ID) {
        Some(v) if is_valid_request_id(v.as_bytes()) => v.set_sensitive(true),
        _ => {
            if let Ok(mut v) = HeaderValue::from_str(&new_request_id()) {
                v.set_sensitive(true);
                headers.insert(REQUEST_ID, v);
            }
        }
    }
}

// Why `set_sensitive`: a value unique to each call (request id, time
// left) would otherwise enter HPACK's dynamic table on every call and push
// out the entries that do repeat (content-type, te, user-agent, :path),
// which then travel as literals again. Sensitive values are sent as
// never-indexed literals (RFC 7541 §6.2.3) and leave the table alone.

/// Whether a request header (a `HeaderName`: lowercase already) goes on to
/// the pattern. On the path of every call, so a `match` rather than a walk
/// over the lists.
fn forwarded(name: &HeaderName) -> bool {
    let n = name.as_str();
    // `trellis-idempotency-*` is the proxy's to set (dataplane), never a
    // client's: a forged fingerprint would replay another request's answer.
    !(n.starts_with("grpc-")
        || n.starts_with("trellis-idempotency-")
        || matches!(
            n,
            "connection"
                | "keep-alive"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "host"
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn request_id_is_kept_when_sane_and_generated_otherwise() {
        assert_eq!(request_id(&headers(&[("x-request-id", "abc-1")])), "abc-1");
        let generated = request_id(&headers(&[("x-request-id", "has space")]));
        assert_eq!(generated.len(), 36, "a UUID: {generated}");
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
        assert!(!is_valid_request_id(&[b'a'; 129]));
        assert!(is_valid_request_id(&[b'a'; 128]));
    }

    #[test]
    fn trace_id_comes_from_traceparent() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
    }

    #[test]
    fn pattern_headers_keep_metadata_and_drop_hop_and_grpc_headers() {
        let mut h = headers(&[
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "grpc-go/1.0"),
            ("grpc-timeout", "5S"),
            ("grpc-accept-encoding", "gzip"),
            ("connection", "close"),
            ("host", "proxy"),
            ("authorization", "Bearer x"),
            ("x-custom", "a"),
            ("x-custom", "b"),
            ("x-trace-bin", "AAEC"),
            ("x-request-id", "rid-7"),
        ]);
        prepare_for_pattern(&mut h);
        for gone in ["grpc-timeout", "grpc-accept-encoding", "connection", "host"] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["authorization"], "Bearer x");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["user-agent"], "grpc-go/1.0");
        assert_eq!(h.get_all("x-custom").iter().count(), 2);
        assert_eq!(h["x-trace-bin"], "AAEC");
        assert_eq!(h[REQUEST_ID], "rid-7");
    }

    #[test]
    fn the_fast_check_drops_exactly_the_listed_headers() {
        for h in HOP_BY_HOP
            .iter()
            .chain(["host", "grpc-timeout", "grpc-x"].iter())
        {
            assert!(!forwarded(&HeaderName::from_static(h)), "{h}");
        }
        for h in [
            "authorization",
            "x-request-id",
            "content-type",
            "user-agent",
            "x-grpc",
        ] {
            assert!(forwarded(&HeaderName::from_static(h)), "{h}");
        }
    }

    #[test]
    fn a_missing_or_bad_request_id_is_minted() {
        let mut h = headers(&[("x-request-id", "bad id")]);
        prepare_for_pattern(&mut h);
        let id = h[REQUEST_ID].to_str().unwrap();
        assert_eq!(id.len(), 36, "{id}");
        let mut h = HeaderMap::new();
        prepare_for_pattern(&mut h);
        assert!(h.contains_key(REQUEST_ID));
        assert_eq!(
            h["te"], "trailers",
            "te set even when the client left it out"
        );
    }
}
