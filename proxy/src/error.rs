//! One error model, two encodings. An [`ApiError`] is what went wrong, in
//! terms a client can act on: a gRPC code, a stable machine-readable
//! `reason` (`NAMESPACE_NOT_FOUND`, `PATTERN_UNAVAILABLE`, …), a message that
//! says what to do, field violations, and a retry delay. At the gRPC edge it
//! becomes a `google.rpc.Status` with `ErrorInfo`, `BadRequest` and
//! `RetryInfo` details; at the HTTP edge, `application/problem+json`
//! (gateway::problem). Internal details never go in it: they are logged.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The `ErrorInfo.domain` of every error the proxy makes.
pub const DOMAIN: &str = "trellis.proxy";

/// How long a client should wait before retrying an UNAVAILABLE call.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: Code,
    pub reason: String,
    pub domain: String,
    pub message: String,
    pub metadata: HashMap<String, String>,
    /// (field, description) for invalid input; all of them, not the first.
    pub violations: Vec<(String, String)>,
    pub retry_after: Option<Duration>,
    /// For errors that exist only in HTTP (413, 415, …): the exact status.
    pub http_status: Option<u16>,
}

impl ApiError {
    pub fn new(code: Code, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.to_string(),
            domain: DOMAIN.to_string(),
            message: message.into(),
            metadata: HashMap::new(),
            violations: Vec::new(),
            retry_after: match code {
                Code::Unavailable => Some(DEFAULT_RETRY),
                _ => None,
            },
            http_status: None,
        }
    }

    /// An HTTP-only error with its own status code.
    pub fn http(status: u16, code: Code, reason: &str, message: impl Into<String>) -> Self {
        let mut e = ApiError::new(code, reason, message);
        e.http_status = Some(status);
        e
    }

    pub fn meta(mut self, key: &str, value: impl Into<String>) -> Self {
        self.metadata.insert(key.to_string(), value.into());
        self
    }

    pub fn violation(mut self, field: impl Into<String>, description: impl Into<String>) -> Self {
        self.violations.push((field.into(), description.into()));
        self
    }

    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub fn invalid_argument(field: &str, description: impl Into<String>) -> Self {
        let description = description.into();
        ApiError::new(
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            format!("{field}: {description}"),
        )
        .violation(field, description)
    }

    /// The gRPC form, with details.
    pub fn to_status(&self) -> Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            self.reason.clone(),
            self.domain.clone(),
            self.metadata.clone(),
        );
        if !self.violations.is_empty() {
            details.set_bad_request(
                self.violations
                    .iter()
                    .map(|(f, d)| FieldViolation::new(f.clone(), d.clone()))
                    .collect::<Vec<_>>(),
            );
        }
        if let Some(d) = self.retry_after {
            details.set_retry_info(Some(d));
        }
        Status::with_error_details(self.code, self.message.clone(), details)
    }

    /// Reads a status back, details included. A status without `ErrorInfo`
    /// gets the code's name as its reason.
    pub fn from_status(s: &Status) -> Self {
        let details = s.get_error_details();
        let (reason, domain, metadata) = match details.error_info() {
            Some(info) => (
                info.reason.clone(),
                info.domain.clone(),
                info.metadata.clone(),
            ),
            None => (
                code_name(s.code()).to_string(),
                String::new(),
                HashMap::new(),
            ),
        };
        ApiError {
            code: s.code(),
            reason,
            domain,
            message: s.message().to_string(),
            metadata,
            violations: details
                .bad_request()
                .map(|b| {
                    b.field_violations
                        .iter()
                        .map(|v| (v.field.clone(), v.description.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            retry_after: details.retry_info().and_then(|r| r.retry_delay),
            http_status: None,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        e.to_status()
    }
}

pub use trellis_proto::code_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_survive_the_round_trip() {
        let e = ApiError::new(Code::Unavailable, "PATTERN_UNAVAILABLE", "down; retry")
            .meta("pattern", "mem")
            .violation("key", "must not be empty");
        let back = ApiError::from_status(&e.to_status());
        assert_eq!(back.reason, "PATTERN_UNAVAILABLE");
        assert_eq!(back.domain, DOMAIN);
        assert_eq!(back.metadata["pattern"], "mem");
        assert_eq!(
            back.violations,
            vec![("key".to_string(), "must not be empty".to_string())]
        );
        assert_eq!(
            back.retry_after,
            Some(DEFAULT_RETRY),
            "UNAVAILABLE carries RetryInfo"
        );
    }

    #[test]
    fn a_plain_status_gets_its_code_as_reason() {
        let e = ApiError::from_status(&Status::not_found("gone"));
        assert_eq!(e.reason, "NOT_FOUND");
        assert_eq!(e.message, "gone");
    }
}
