//! `Forward`: the innermost service. Opens one HTTP/2 stream on the
//! pattern's connection with the call's path, metadata and message bytes,
//! and answers with the pattern's response, whose body is streamed back
//! as it arrives.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Method, Response};
use tower::Service;

use super::body::CallBody;
use super::{Call, errors};
use crate::error::ApiError;

#[derive(Clone, Copy)]
pub struct Forward;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<CallBody>, ApiError>> + Send>>;

impl Service<Call> for Forward {
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> BoxFuture {
        Box::pin(forward(call))
    }
}

async fn forward(call: Call) -> Result<Response<CallBody>, ApiError> {
    let upstream = call
        .upstream
        .ok_or_else(|| errors::internal("a call reached Forward without a route"))?;
    let streaming = call.method.server_streaming;
    let mut head = http::Request::new(());
    *head.method_mut() = Method::POST;
    *head.uri_mut() = upstream.uri(call.path);
    *head.headers_mut() = call.headers;
    let response = upstream
        .send(head, call.message)
        .await
        .map_err(|e| errors::unreachable(&call.namespace, upstream.pattern(), &e))?;
    let response = response.await.map_err(|e| {
        if e.is_go_away() || e.is_io() {
            upstream.reset_connection();
        }
        errors::stream_failed(&call.namespace, upstream.pattern(), streaming, &e)
    })?;
    // HTTP/2 carries no connection-specific headers (h2 refuses them), so
    // the pattern's headers pass as they are.
    let (parts, recv) = response.into_parts();
    let status_in_headers = super::body::status_of(&parts.headers);
    let body = CallBody::upstream(recv, status_in_headers, upstream, call.namespace, streaming);
    Ok(Response::from_parts(parts, body))
}
