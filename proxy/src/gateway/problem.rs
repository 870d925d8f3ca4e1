//! RFC 9457 `application/problem+json` from an [`ApiError`]: `type`,
//! `title`, `status`, `detail`, `instance` (the request path), plus `code`
//! (the gRPC code name), `reason`, `request_id`, `trace_id` and `errors`
//! (field violations). `Retry-After` when the error carries a retry delay.

use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::error::{ApiError, code_name};
use tonic::Code;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// The problem document and its HTTP status.
pub fn document(
    e: &ApiError,
    instance: &str,
    request_id: &str,
    trace_id: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let status = StatusCode::from_u16(e.http_status.unwrap_or_else(|| status_for(e)))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let errors: Vec<serde_json::Value> = e
        .violations
        .iter()
        .map(|(field, detail)| json!({"field": field, "detail": detail}))
        .collect();
    let mut doc = json!({
        // A stable identifier per reason; RFC 9457 allows a non-resolvable URI.
        "type": format!("urn:trellis:problem:{}", e.reason.to_ascii_lowercase().replace('_', "-")),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": e.message,
        "instance": instance,
        "code": code_name(e.code),
        "reason": e.reason,
        "request_id": request_id,
    });
    if let Some(obj) = doc.as_object_mut() {
        if let Some(t) = trace_id {
            obj.insert("trace_id".into(), json!(t));
        }
        if !errors.is_empty() {
            obj.insert("errors".into(), json!(errors));
        }
        if !e.metadata.is_empty() {
            obj.insert("metadata".into(), json!(e.metadata));
        }
    }
    (status, doc)
}

/// The HTTP status for an error (the rule docs/http-gateway.md states):
/// grpc-gateway's table for the gRPC code, except where the reason names a
/// more exact status —
/// - a refusal because of the target's current state is 409 Conflict
///   (RFC 9110 §15.5.10): starting a pattern that is already running;
/// - a key reused with another request is the IETF Idempotency-Key
///   draft's 422.
fn status_for(e: &ApiError) -> u16 {
    match e.reason.as_str() {
        "ALREADY_RUNNING" => 409,
        "IDEMPOTENCY_KEY_REUSED" => 422,
        _ => http_status(e.code),
    }
}

/// A complete problem response (body bytes; the caller wraps the body type).
pub fn response(
    e: &ApiError,
    instance: &str,
    request_id: &str,
    trace_id: Option<&str>,
) -> Response<Vec<u8>> {
    let (status, doc) = document(e, instance, request_id, trace_id);
    let mut resp = Response::new(serde_json::to_vec(&doc).unwrap_or_default());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE),
    );
    if status == StatusCode::UNAUTHORIZED {
        // RFC 9110 §11.6.1: a 401 says how to authenticate.
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(crate::access::CHALLENGE),
        );
    }
    if let Some(d) = e.retry_after {
        // Whole seconds, rounded up: Retry-After has no fractions.
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// The HTTP status for a gRPC code: the table grpc-gateway uses.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::Unknown => 500,
        Code::InvalidArgument => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists => 409,
        Code::PermissionDenied => 403,
        Code::Unauthenticated => 401,
        Code::ResourceExhausted => 429,
        Code::FailedPrecondition => 400,
        Code::Aborted => 409,
        Code::OutOfRange => 400,
        Code::Unimplemented => 501,
        Code::Internal => 500,
        Code::Unavailable => 503,
        Code::DataLoss => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_table_matches_grpc_gateway() {
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::Unavailable), 503);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::FailedPrecondition), 400);
        assert_eq!(http_status(Code::Cancelled), 499);
        assert_eq!(http_status(Code::DeadlineExceeded), 504);
    }
    use tonic::Code;

    #[test]
    fn unavailable_is_503_with_retry_after() {
        let e =
            ApiError::new(Code::Unavailable, "PATTERN_UNAVAILABLE", "down").meta("pattern", "mem");
        let r = response(&e, "/v1/x", "rid", Some("abc"));
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["content-type"], CONTENT_TYPE);
        let doc: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(doc["code"], "UNAVAILABLE");
        assert_eq!(doc["reason"], "PATTERN_UNAVAILABLE");
        assert_eq!(doc["instance"], "/v1/x");
        assert_eq!(doc["request_id"], "rid");
        assert_eq!(doc["trace_id"], "abc");
        assert_eq!(doc["title"], "Service Unavailable");
        assert_eq!(doc["metadata"]["pattern"], "mem");
    }

    #[test]
    fn a_401_carries_the_bearer_challenge() {
        let e = ApiError::new(Code::Unauthenticated, "CREDENTIALS_MISSING", "who?");
        let r = response(&e, "/v1/x", "rid", None);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"trellis\"");
        let e = ApiError::new(Code::PermissionDenied, "ROLE_MISSING", "no");
        let r = response(&e, "/v1/x", "rid", None);
        assert_eq!(r.status(), 403);
        assert!(r.headers().get("www-authenticate").is_none());
    }

    #[test]
    fn violations_become_errors() {
        let e =
            ApiError::invalid_argument("key", "must not be empty").violation("value", "too big");
        let (status, doc) = document(&e, "/p", "r", None);
        assert_eq!(status, 400);
        assert_eq!(doc["errors"][1]["field"], "value");
        assert!(doc.get("trace_id").is_none());
    }

    #[test]
    fn a_conflict_with_the_current_state_is_409() {
        let e = ApiError::new(Code::FailedPrecondition, "ALREADY_RUNNING", "running");
        assert_eq!(document(&e, "/", "r", None).0, 409);
        // Other failed preconditions keep grpc-gateway's 400.
        let e = ApiError::new(Code::FailedPrecondition, "FAILED_PRECONDITION", "no keys");
        assert_eq!(document(&e, "/", "r", None).0, 400);
    }

    #[test]
    fn http_only_errors_keep_their_status() {
        let e = ApiError::http(413, Code::InvalidArgument, "BODY_TOO_LARGE", "too big");
        assert_eq!(document(&e, "/", "r", None).0, 413);
    }
}
