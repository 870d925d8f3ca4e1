//! `Drain`: when the proxy shuts down, open streams (`Subscribe`) end at
//! once with UNAVAILABLE `PROXY_SHUTTING_DOWN`, so a subscription never
//! holds up the drain; unary calls are left to finish within
//! `shutdown_grace`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::shutdown::CancellationToken;
use http::Response;
use tower::{Layer, Service};

use super::Call;
use super::body::CallBody;
use crate::error::ApiError;

pub struct DrainLayer {
    closing: CancellationToken,
}

impl DrainLayer {
    /// `closing` is cancelled when the proxy's doors start to close.
    pub fn new(closing: CancellationToken) -> Self {
        DrainLayer { closing }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;
    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            closing: self.closing.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    closing: CancellationToken,
}

impl<S> Service<Call> for Drain<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = DrainFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let closing = call.method.server_streaming.then(|| self.closing.clone());
        DrainFuture {
            inner: self.inner.call(call),
            closing,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct DrainFuture<F> {
        #[pin]
        inner: F,
        closing: Option<CancellationToken>,
    }
}

impl<F> Future for DrainFuture<F>
where
    F: Future<Output = Result<Response<CallBody>, ApiError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(closing) = this.closing.take() {
            response
                .body_mut()
                .end_when(Box::pin(closing.cancelled_owned()));
        }
        Poll::Ready(Ok(response))
    }
}
