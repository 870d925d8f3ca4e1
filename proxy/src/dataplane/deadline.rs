//! `Deadline`: the call's deadline, fixed at the edge as `min(client
//! grpc-timeout, request_timeout)`, enforced here. A unary call is bounded
//! whole — its answer and trailers included — and the time left (plus
//! [`PATTERN_MARGIN`]) is written into the `grpc-timeout` the pattern
//! receives, so the pattern stops working on it when the proxy stops
//! waiting. A stream (`Subscribe`) is
//! bounded only until it opens and carries no `grpc-timeout`: it lives
//! until one side ends it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, Response};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::body::CallBody;
use super::{Call, errors, wire};
use crate::error::ApiError;
use crate::upstream::Upstream;

const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// How much longer than the proxy the pattern is told to wait. Both sides
/// time the same deadline with millisecond timers; if the pattern's fired
/// first, the client would get the pattern's own timeout status (tonic's
/// is CANCELLED "Timeout expired") instead of the proxy's
/// DEADLINE_EXCEEDED naming the slow pattern. With the margin the proxy,
/// which answers the client, always gives up first, and the pattern stops
/// working on the abandoned call a moment later.
pub const PATTERN_MARGIN: Duration = Duration::from_millis(20);

pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
}

/// What a deadline message names.
struct About {
    upstream: Option<Upstream>,
    namespace: Arc<str>,
    streaming: bool,
    budget: Duration,
}

impl About {
    fn error(&self) -> ApiError {
        let pattern = self.upstream.as_ref().map_or("?", Upstream::pattern);
        errors::timed_out(&self.namespace, pattern, self.streaming, self.budget)
    }
}

impl<S> Service<Call> for Deadline<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let about = About {
            upstream: call.upstream.clone(),
            namespace: call.namespace.clone(),
            streaming: call.method.server_streaming,
            budget: call.budget,
        };
        let left = call.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return DeadlineFuture {
                inner: None,
                sleep: None,
                about,
            };
        }
        if !about.streaming {
            let mut v = wire::grpc_timeout_value(left + PATTERN_MARGIN);
            // Different on every call: kept out of HPACK's table (see
            // metadata::prepare_for_pattern).
            v.set_sensitive(true);
            call.headers.insert(GRPC_TIMEOUT, v);
        }
        DeadlineFuture {
            sleep: Some(Box::pin(tokio::time::sleep_until(call.deadline))),
            inner: Some(self.inner.call(call)),
            about,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct DeadlineFuture<F> {
        // `None`: the deadline had passed before the call started.
        #[pin]
        inner: Option<F>,
        sleep: Option<Pin<Box<Sleep>>>,
        about: About,
    }
}

impl<F> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<CallBody>, ApiError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(this.about.error()));
        };
        if let Poll::Ready(result) = inner.poll(cx) {
            let mut response = result?;
            if !this.about.streaming
                && let Some(sleep) = this.sleep.take()
            {
                // The same timer bounds the rest of a unary answer.
                response.body_mut().bound_by(sleep, this.about.budget);
            }
            return Poll::Ready(Ok(response));
        }
        match this.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
            Some(Poll::Ready(())) | None => Poll::Ready(Err(this.about.error())),
            Some(Poll::Pending) => Poll::Pending,
        }
    }
}
