//! Every error the data plane makes, in one place: what happened, to which
//! pattern and namespace, and what to do. Statuses the *pattern* produced
//! are never rewritten: they pass through in its trailers untouched.

use std::time::Duration;

use tonic::Code;

use super::body::CallBody;
use super::methods::Methods;
use super::wire::MAX_MESSAGE_BYTES;
use crate::error::ApiError;
use crate::supervisor::State;
use crate::upstream::{Upstream, UpstreamError};

/// An error as the trailers-only gRPC response that carries it.
pub fn response(e: ApiError) -> http::Response<CallBody> {
    let code = e.code;
    let mut response: http::Response<CallBody> = e.to_status().into_http();
    *response.body_mut() = CallBody::ended(code);
    response
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

pub fn unknown_method(path: &str, methods: &Methods) -> ApiError {
    ApiError::new(
        Code::Unimplemented,
        "METHOD_NOT_FOUND",
        format!(
            "{path:?} is not a method of the data API; methods: {}",
            methods.paths().join(", ")
        ),
    )
    .meta("path", path)
}

pub fn request_too_slow(budget: Duration) -> ApiError {
    ApiError::new(
        Code::DeadlineExceeded,
        "REQUEST_TIMEOUT",
        format!(
            "the request message did not arrive within the call's deadline ({}); send it \
             without pausing, or raise the deadline",
            human(budget)
        ),
    )
}

pub fn request_unreadable(why: &str) -> ApiError {
    ApiError::new(
        Code::Cancelled,
        "REQUEST_UNREADABLE",
        format!("the request body could not be read: {why}"),
    )
}

pub fn compressed_request() -> ApiError {
    ApiError::new(
        Code::Unimplemented,
        "COMPRESSED_MESSAGE",
        "the request message is compressed; the proxy accepts uncompressed messages only: \
         send without grpc-encoding (turn compression off in the client)",
    )
}

pub fn request_too_large(len: usize) -> ApiError {
    ApiError::new(
        Code::ResourceExhausted,
        "MESSAGE_TOO_LARGE",
        format!(
            "the request message is {len} bytes; at most {MAX_MESSAGE_BYTES} bytes (4 MiB) are \
             accepted: send smaller values, or split them over several keys"
        ),
    )
    .meta("limit", MAX_MESSAGE_BYTES.to_string())
}

pub fn more_than_one_message() -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        "MORE_THAN_ONE_MESSAGE",
        "the request carries more than one message; every data method takes exactly one",
    )
}

pub fn truncated_message() -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        "TRUNCATED_MESSAGE",
        "the request body ended inside its message; send the whole length-prefixed message",
    )
}

pub fn no_message() -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        "MISSING_MESSAGE",
        "the request has no message; every data method takes exactly one",
    )
}

pub fn malformed_request(e: super::wire::ScanError) -> ApiError {
    ApiError::new(
        Code::InvalidArgument,
        "MALFORMED_MESSAGE",
        format!("the request message cannot be read: {e}; send a message of the method's type"),
    )
}

pub fn bad_idempotency_key(rule: &str) -> ApiError {
    ApiError::invalid_argument(trellis_proto::idempotency::KEY, rule)
}

pub fn empty_namespace() -> ApiError {
    ApiError::invalid_argument(
        "namespace",
        "must not be empty; set it to one of the configured namespaces",
    )
}

pub fn unknown_namespace(namespace: &str, known: &[&str]) -> ApiError {
    ApiError::new(
        Code::NotFound,
        "NAMESPACE_NOT_FOUND",
        format!(
            "namespace {namespace:?} is not configured; known namespaces: {}. Use one of them, \
             or add it under `namespaces:` in the proxy config",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ),
    )
    .meta("namespace", namespace)
}

pub fn not_serving(
    namespace: &str,
    pattern: &str,
    state: State,
    last_error: Option<&str>,
) -> ApiError {
    let why = last_error
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    ApiError::new(
        Code::Unavailable,
        "PATTERN_UNAVAILABLE",
        format!(
            "namespace {namespace:?} is served by pattern {pattern:?}, which is {state}{why}; \
             retry with backoff, and see `trellis patterns` for its state"
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
    .meta("state", state.as_str())
}

/// No replica of the namespace's pattern serves; `states`: each one's
/// name and state.
pub fn no_replica_serving(namespace: &str, pattern: &str, states: &[String]) -> ApiError {
    ApiError::new(
        Code::Unavailable,
        "PATTERN_UNAVAILABLE",
        format!(
            "namespace {namespace:?} is served by pattern {pattern:?}, none of whose {} replicas \
             is SERVING ({}); retry with backoff, and see `trellis patterns` for their state",
            states.len(),
            states.join(", ")
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
}

/// The namespace's pattern does not serve the called interface.
pub fn not_implemented(namespace: &str, service: &str, upstream: &Upstream) -> ApiError {
    let interfaces = upstream.interfaces();
    let implements = if interfaces.is_empty() {
        "no data interface".to_string()
    } else {
        interfaces.join(", ")
    };
    let hint = if service == trellis_proto::PUB_SUB_SERVICE {
        "use a namespace served by a pub/sub pattern (memstore, trellis-nats), or route this \
         one to such a pattern in the proxy config"
    } else {
        "use a namespace served by a key-value pattern (memstore, trellis-redis, \
         trellis-postgres), or route this one to such a pattern in the proxy config"
    };
    ApiError::new(
        Code::Unimplemented,
        "INTERFACE_NOT_IMPLEMENTED",
        format!(
            "namespace {namespace:?} is served by pattern {:?}, which implements {implements} \
             but not {service}; {hint}",
            upstream.pattern()
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", upstream.pattern())
    .meta("interfaces", interfaces.join(","))
}

/// The call could not be sent: it never reached the pattern.
pub fn unreachable(namespace: &str, pattern: &str, e: &UpstreamError) -> ApiError {
    ApiError::new(
        Code::Unavailable,
        "PATTERN_UNAVAILABLE",
        format!(
            "pattern {pattern:?} (namespace {namespace:?}) is unavailable: {e}; retry with backoff"
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
}

/// The call was sent, and its HTTP/2 stream failed before it ended: the
/// gRPC mapping of HTTP/2 errors (grpc/PROTOCOL-HTTP2.md), worded for the
/// pattern. A stream that failed because the connection or process went
/// away is UNAVAILABLE.
pub fn stream_failed(namespace: &str, pattern: &str, streaming: bool, e: &h2::Error) -> ApiError {
    use h2::Reason;
    let lost = e.is_io() || e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM);
    let (code, reason) = match e.reason() {
        _ if lost => (Code::Unavailable, "PATTERN_UNAVAILABLE"),
        Some(Reason::CANCEL) => (Code::Cancelled, "PATTERN_CANCELLED"),
        Some(Reason::ENHANCE_YOUR_CALM) => (Code::ResourceExhausted, "PATTERN_OVERLOADED"),
        Some(Reason::INADEQUATE_SECURITY) => (Code::PermissionDenied, "PATTERN_REFUSED"),
        _ => (Code::Internal, "PATTERN_PROTOCOL_ERROR"),
    };
    let what = if streaming {
        "the stream ended; subscribe again"
    } else {
        "retry with backoff"
    };
    ApiError::new(
        code,
        reason,
        format!("pattern {pattern:?} (namespace {namespace:?}) failed the call: {e}; {what}"),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
}

pub fn ended_without_status(namespace: &str, pattern: &str, streaming: bool) -> ApiError {
    let what = if streaming {
        "subscribe again"
    } else {
        "retry"
    };
    ApiError::new(
        Code::Unavailable,
        "PATTERN_UNAVAILABLE",
        format!(
            "pattern {pattern:?} (namespace {namespace:?}) ended the call without a status; {what}"
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
}

pub fn timed_out(namespace: &str, pattern: &str, streaming: bool, within: Duration) -> ApiError {
    let what = if streaming {
        "open the subscription"
    } else {
        "answer"
    };
    ApiError::new(
        Code::DeadlineExceeded,
        "PATTERN_TIMEOUT",
        format!(
            "pattern {pattern:?} did not {what} for namespace {namespace:?} within {}; retry, or \
             raise the client deadline / `request_timeout`",
            human(within)
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
}

pub fn response_too_large(namespace: &str, pattern: &str, len: usize) -> ApiError {
    ApiError::new(
        Code::ResourceExhausted,
        "MESSAGE_TOO_LARGE",
        format!(
            "pattern {pattern:?} (namespace {namespace:?}) answered with a message of {len} \
             bytes; at most {MAX_MESSAGE_BYTES} bytes (4 MiB) are passed on: ask for less \
             (a smaller page, a smaller value)"
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
    .meta("limit", MAX_MESSAGE_BYTES.to_string())
}

pub fn shutting_down() -> ApiError {
    ApiError::new(
        Code::Unavailable,
        "PROXY_SHUTTING_DOWN",
        "the proxy is shutting down, so this subscription ended; subscribe again once it is \
         back, or through another replica (messages published in between are not delivered)",
    )
    .retry_after(SHUTDOWN_RETRY)
}

/// A call that reached the proxy after its doors began to close.
pub fn closing() -> ApiError {
    ApiError::new(
        Code::Unavailable,
        "PROXY_SHUTTING_DOWN",
        "the proxy is shutting down and takes no new calls; send the call again: to another \
         replica, or to this address once the proxy is back (nothing was done)",
    )
    .retry_after(SHUTDOWN_RETRY)
}

/// How soon a client is told to try again after a shutdown refusal: a
/// replacement or another replica is usually there by then.
const SHUTDOWN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The proxy holds `max` calls already (`max_in_flight`).
pub fn overloaded(namespace: &str, max: u32) -> ApiError {
    ApiError::new(
        Code::Unavailable,
        "PROXY_OVERLOADED",
        format!(
            "the proxy is at its limit of {max} calls in flight (`max_in_flight`), so this call \
             was refused before it started; retry after the delay, preferably on another replica"
        ),
    )
    .meta("namespace", namespace)
    .meta("limit", max.to_string())
}

/// The namespace's (or the caller's) token bucket is empty.
pub fn rate_limited(
    namespace: &str,
    policy: &str,
    per_second: u32,
    caller: Option<&str>,
    wait: Duration,
) -> ApiError {
    let whose = match caller {
        Some(c) => format!("caller {c:?} in namespace {namespace:?}"),
        None => format!("namespace {namespace:?}"),
    };
    let mut e = ApiError::new(
        Code::ResourceExhausted,
        "RATE_LIMITED",
        format!(
            "{whose} is over its rate limit of {per_second} calls per second (policy \
             {policy:?}, `rate_limit`); retry after {}",
            human(wait)
        ),
    )
    .meta("namespace", namespace)
    .meta("policy", policy)
    .meta("limit", per_second.to_string())
    .retry_after(wait);
    if let Some(c) = caller {
        e = e.meta("caller", c);
    }
    e
}

/// The namespace has `max` calls in flight (and its queue, if any, is
/// full or the wait ran out).
pub fn concurrency_limited(namespace: &str, policy: &str, max: u32, queued: bool) -> ApiError {
    let how = if queued {
        "no slot came free within the queue's wait"
    } else {
        "it is at its limit"
    };
    ApiError::new(
        Code::ResourceExhausted,
        "CONCURRENCY_LIMIT",
        format!(
            "namespace {namespace:?} allows {max} calls in flight (policy {policy:?}, \
             `concurrency.max_in_flight`) and {how}; retry after the delay, or send fewer \
             calls at once"
        ),
    )
    .meta("namespace", namespace)
    .meta("policy", policy)
    .meta("limit", max.to_string())
    .retry_after(CONCURRENCY_RETRY)
}

/// What a refused call is told to wait when a slot's freeing is not known.
pub const CONCURRENCY_RETRY: Duration = Duration::from_millis(100);

/// The namespace's circuit is open (or half-open with every probe out).
pub fn circuit_open(namespace: &str, pattern: &str, policy: &str, wait: Duration) -> ApiError {
    ApiError::new(
        Code::Unavailable,
        "CIRCUIT_OPEN",
        format!(
            "the circuit for namespace {namespace:?} (pattern {pattern:?}) is open after repeated \
             failures (policy {policy:?}, `circuit_breaker`), so the call was not sent; retry \
             after {}, and see `trellis patterns get {pattern}`",
            human(wait)
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", pattern)
    .meta("policy", policy)
    .retry_after(wait)
}

pub fn internal(what: &str) -> ApiError {
    ApiError::new(Code::Internal, "INTERNAL", what.to_string())
}
