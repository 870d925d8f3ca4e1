//! `Drain`: when the proxy shuts down, open streams (`Subscribe`) end at
//! once with UNAVAILABLE `PROXY_SHUTTING_DOWN`, so a subscription never
//! holds up the drain; unary calls are left to finish within
//! `shutdown_grace`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use tokio::sync::watch;
use tower::{Layer, Service};

use super::Call;
use super::body::CallBody;
use crate::error::ApiError;

pub struct DrainLayer {
    stopping: watch::Receiver<bool>,
}

impl DrainLayer {
    /// `stopping` turns `true` when the proxy shuts down.
    pub fn new(stopping: watch::Receiver<bool>) -> Self {
        DrainLayer { stopping }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;
    fn layer(&self, inner: S) -> Drain<S> {
        Drain {
            inner,
            stopping: self.stopping.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    stopping: watch::Receiver<bool>,
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
        let stopping = call.method.server_streaming.then(|| self.stopping.clone());
        DrainFuture {
            inner: self.inner.call(call),
            stopping,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct DrainFuture<F> {
        #[pin]
        inner: F,
        stopping: Option<watch::Receiver<bool>>,
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
        if let Some(mut stopping) = this.stopping.take() {
            response.body_mut().end_when(Box::pin(async move {
                // An error means the proxy is gone: end the stream too.
                let _ = stopping.wait_for(|down| *down).await;
            }));
        }
        Poll::Ready(Ok(response))
    }
}
