//! `WhenDone`: runs a hook once with a call's final status code, whichever
//! way the call ends — an error from a layer below, or a response whose
//! body ends later (`CallBody::on_end`). The layers that must know how a
//! call ended (metrics, the call log, spans, the circuit breaker, the
//! limits' slots) all use it, so "how did it end" is decided in one place.
//!
//! If the future is dropped before it finishes (the client went away while
//! the call waited on a queue or a retry's backoff), the hook is dropped
//! without running: whatever it owns (a concurrency slot, an in-flight
//! count) is released by its own `Drop`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use tonic::Code;

use super::body::{CallBody, OnEnd};
use crate::error::ApiError;

/// When the hook runs for a call answered with a response.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// When the response body ends (unary answers, whole streams).
    End,
    /// As soon as the response headers arrive: the code is the
    /// trailers-only status, or OK for a call that opened.
    Headers,
}

pin_project_lite::pin_project! {
    pub struct WhenDone<F> {
        #[pin]
        inner: F,
        hook: Option<OnEnd>,
        at: At,
    }
}

impl<F> WhenDone<F> {
    pub fn new(inner: F, hook: OnEnd) -> Self {
        WhenDone {
            inner,
            hook: Some(hook),
            at: At::End,
        }
    }

    /// No hook: the call passes untouched.
    pub fn passing(inner: F) -> Self {
        WhenDone {
            inner,
            hook: None,
            at: At::End,
        }
    }

    pub fn at(mut self, at: At) -> Self {
        self.at = at;
        self
    }
}

impl<F> Future for WhenDone<F>
where
    F: Future<Output = Result<Response<CallBody>, ApiError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let Some(hook) = this.hook.take() {
            match (&mut result, *this.at) {
                (Err(e), _) => hook(e.code),
                (Ok(response), At::Headers) => {
                    hook(response.body().trailers_only().unwrap_or(Code::Ok));
                }
                (Ok(response), At::End) => response.body_mut().on_end(hook),
            }
        }
        Poll::Ready(result)
    }
}
