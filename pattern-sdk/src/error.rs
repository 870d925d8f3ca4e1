//! The error a pattern returns, and the one place it becomes a gRPC status.

use std::fmt;

use tonic::{Code, Status};

/// One thing wrong with a request or a configuration: which field, and what
/// to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's name, e.g. `key` or `config.max_keys`.
    pub field: String,
    /// What is wrong and how to fix it, e.g. "must not be empty".
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// What a pattern returns when an operation fails. Each variant maps to one
/// gRPC status code (see `From<Error> for Status`); messages are shown to the
/// caller, so say what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The thing asked for does not exist. `NOT_FOUND`.
    #[error("{what} not found")]
    NotFound { what: String },

    /// The request or configuration is wrong, and retrying it unchanged cannot
    /// succeed. Carries every violation found, not just the first.
    /// `INVALID_ARGUMENT`.
    #[error("{}", join(.0))]
    InvalidArgument(Vec<FieldViolation>),

    /// The system is not in a state where the operation can run (e.g. called
    /// twice). `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),

    /// A transient condition: retrying later may succeed (a backend is
    /// unreachable, the pattern is starting or stopping). `UNAVAILABLE`.
    #[error("{0}")]
    Unavailable(String),

    /// A limit was reached (a quota, a capacity). `RESOURCE_EXHAUSTED`.
    #[error("{0}")]
    ResourceExhausted(String),

    /// An idempotency key was used before for a different request.
    /// `INVALID_ARGUMENT`, reason `IDEMPOTENCY_KEY_REUSED`.
    #[error("{0}")]
    IdempotencyKeyReused(String),

    /// The first call with an idempotency key is still running. `ABORTED`,
    /// reason `IDEMPOTENCY_KEY_IN_USE`, with a retry delay.
    #[error("{0}")]
    IdempotencyKeyInUse(String),

    /// A bug or an unexpected failure. The detail is logged by the pattern;
    /// the caller gets a generic message. `INTERNAL`.
    #[error("internal error: {0}")]
    Internal(String),
}

fn join(violations: &[FieldViolation]) -> String {
    let parts: Vec<String> = violations.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

impl Error {
    /// `NOT_FOUND`: `what` names the missing thing, e.g. `key "a" in namespace "n"`.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound { what: what.into() }
    }

    /// `INVALID_ARGUMENT` for one field.
    pub fn invalid_argument(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, message)])
    }

    /// `FAILED_PRECONDITION`.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::FailedPrecondition(message.into())
    }

    /// `UNAVAILABLE`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable(message.into())
    }

    /// `RESOURCE_EXHAUSTED`.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::ResourceExhausted(message.into())
    }

    /// `INTERNAL`: `detail` is logged, never sent to the caller. For an
    /// `anyhow::Error`, pass `format!("{e:#}")` to keep its cause chain.
    pub fn internal(detail: impl fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound { .. } => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::IdempotencyKeyReused(_) => Code::InvalidArgument,
            Self::IdempotencyKeyInUse(_) => Code::Aborted,
            Self::Internal(_) => Code::Internal,
        }
    }
}

/// The message an `INTERNAL` status carries instead of the detail.
pub(crate) const INTERNAL_MESSAGE: &str =
    "internal error in the pattern; its log (stderr) has the details";

/// The `ErrorInfo.domain` of errors a pattern built on the SDK returns.
pub const DOMAIN: &str = "trellis.pattern";

/// The retry delay suggested with UNAVAILABLE and RESOURCE_EXHAUSTED.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The retry delay suggested while an idempotency key's first call runs.
pub const IN_USE_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// A `google.rpc.Status` with details: `ErrorInfo` (a stable reason),
/// `BadRequest` with every field violation, `RetryInfo` where retrying
/// helps. Internal details are logged, never sent.
impl From<Error> for Status {
    fn from(err: Error) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};
        let code = err.code();
        let reason = match &err {
            Error::NotFound { .. } => "NOT_FOUND",
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Error::Unavailable(_) => "BACKEND_UNAVAILABLE",
            Error::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Error::IdempotencyKeyReused(_) => "IDEMPOTENCY_KEY_REUSED",
            Error::IdempotencyKeyInUse(_) => "IDEMPOTENCY_KEY_IN_USE",
            Error::Internal(_) => "INTERNAL",
        };
        let mut details = ErrorDetails::new();
        details.set_error_info(reason, DOMAIN, std::collections::HashMap::new());
        if let Error::IdempotencyKeyReused(m) = &err {
            details.set_bad_request(vec![tonic_types::FieldViolation::new(
                crate::idempotency::KEY,
                m.clone(),
            )]);
        }
        if let Error::InvalidArgument(violations) = &err {
            details.set_bad_request(
                violations
                    .iter()
                    .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.message.clone()))
                    .collect::<Vec<_>>(),
            );
        }
        if matches!(err, Error::Unavailable(_) | Error::ResourceExhausted(_)) {
            details.set_retry_info(Some(RETRY_AFTER));
        }
        if matches!(err, Error::IdempotencyKeyInUse(_)) {
            details.set_retry_info(Some(IN_USE_RETRY));
        }
        let message = match err {
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                INTERNAL_MESSAGE.to_string()
            }
            other => other.to_string(),
        };
        Status::with_error_details(code, message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_its_code() {
        let cases = [
            (Error::not_found("key \"a\""), Code::NotFound),
            (Error::invalid_argument("key", "bad"), Code::InvalidArgument),
            (Error::failed_precondition("no"), Code::FailedPrecondition),
            (Error::unavailable("later"), Code::Unavailable),
            (Error::resource_exhausted("full"), Code::ResourceExhausted),
            (Error::internal("boom"), Code::Internal),
        ];
        for (err, want) in cases {
            assert_eq!(Status::from(err).code(), want);
        }
    }

    #[test]
    fn statuses_carry_error_info_bad_request_and_retry_info() {
        use tonic_types::StatusExt;
        let s = Status::from(Error::InvalidArgument(vec![
            FieldViolation::new("key", "empty"),
            FieldViolation::new("value", "too big"),
        ]));
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            s.get_details_bad_request().unwrap().field_violations.len(),
            2
        );
        assert!(s.get_details_retry_info().is_none());
        let s = Status::from(Error::unavailable("redis down"));
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "BACKEND_UNAVAILABLE"
        );
        assert!(s.get_details_retry_info().is_some());
    }

    #[test]
    fn messages_reach_the_caller() {
        let status = Status::from(Error::not_found("key \"a\" in namespace \"n\""));
        assert_eq!(status.message(), "key \"a\" in namespace \"n\" not found");
        let status = Status::from(Error::resource_exhausted("store is full"));
        assert_eq!(status.message(), "store is full");
    }

    #[test]
    fn every_violation_is_reported() {
        let err = Error::InvalidArgument(vec![
            FieldViolation::new("namespace", "must not be empty"),
            FieldViolation::new("key", "must not be empty"),
        ]);
        let status = Status::from(err);
        assert_eq!(
            status.message(),
            "namespace: must not be empty; key: must not be empty"
        );
    }

    #[test]
    fn internal_detail_is_not_sent_to_the_caller() {
        let status = Status::from(Error::internal("password=hunter2 rejected by db"));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
        assert_eq!(status.message(), INTERNAL_MESSAGE);
    }
}
