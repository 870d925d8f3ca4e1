//! The proxy's `trellis.data.v1.PubSub`: routes each call by namespace with
//! the data plane's [`Router`] and forwards it to the owning pattern.
//!
//! - `Publish` is a unary call with a deadline, like every `KeyValue` call.
//! - `Subscribe` is forwarded as a stream end to end. Only opening it is
//!   bounded (by the same deadline); the stream itself has none. The
//!   downstream stream owns the upstream call, so when the client goes away
//!   tonic drops the downstream stream, which drops the upstream call
//!   (RST_STREAM to the pattern), which ends the backend subscription.
//!   When the pattern fails or restarts the stream ends with UNAVAILABLE;
//!   when the proxy shuts down it ends with UNAVAILABLE at once, so open
//!   subscriptions never hold up the drain.
//! - A namespace whose pattern does not implement PubSub is UNIMPLEMENTED,
//!   naming the pattern and what it does implement.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::codec::Streaming;
use tonic::{Code, Request, Response, Status};
use trellis_proto::PUB_SUB_SERVICE;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::pub_sub_server::{PubSub, PubSubServer};
use trellis_proto::data::v1::{Message, PublishRequest, PublishResponse, SubscribeRequest};

use crate::dataplane::{Router, Target, annotate, client_deadline, forwarded_metadata};
use crate::error::ApiError;
use crate::server::MAX_MESSAGE_BYTES;

/// The proxy's `trellis.data.v1.PubSub`.
pub struct PubSubProxy {
    router: Router,
    request_timeout: Duration,
    /// Becomes `true` when the proxy shuts down.
    stopping: watch::Receiver<bool>,
}

impl PubSubProxy {
    pub fn new(router: Router, request_timeout: Duration, stopping: watch::Receiver<bool>) -> Self {
        PubSubProxy {
            router,
            request_timeout,
            stopping,
        }
    }

    /// The service, with the proxy's message size limits.
    pub fn server(
        router: Router,
        request_timeout: Duration,
        stopping: watch::Receiver<bool>,
    ) -> PubSubServer<Self> {
        PubSubServer::new(Self::new(router, request_timeout, stopping))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The pattern serving `namespace`, if it is routable and implements
    /// PubSub.
    fn route(&self, namespace: &str) -> Result<Target, Status> {
        let target = self.router.route(namespace)?;
        if target.interfaces.iter().any(|i| i == PUB_SUB_SERVICE) {
            Ok(target)
        } else {
            Err(not_implemented(namespace, &target))
        }
    }

    /// `min(client grpc-timeout, request_timeout)`.
    fn deadline<T>(&self, req: &Request<T>) -> Duration {
        client_deadline(req)
            .map(|d| d.min(self.request_timeout))
            .unwrap_or(self.request_timeout)
    }
}

fn not_implemented(namespace: &str, target: &Target) -> Status {
    let implements = if target.interfaces.is_empty() {
        "no data interface".to_string()
    } else {
        target.interfaces.join(", ")
    };
    ApiError::new(
        Code::Unimplemented,
        "INTERFACE_NOT_IMPLEMENTED",
        format!(
            "namespace {namespace:?} is served by pattern {:?}, which implements {implements} \
             but not {PUB_SUB_SERVICE}; use a namespace served by a pub/sub pattern (memstore, \
             trellis-nats), or route this one to such a pattern in the proxy config",
            target.pattern
        ),
    )
    .meta("namespace", namespace)
    .meta("pattern", target.pattern.clone())
    .meta("interfaces", target.interfaces.join(","))
    .into()
}

fn timed_out(namespace: &str, pattern: &str, what: &str, deadline: Duration) -> Status {
    ApiError::new(
        Code::DeadlineExceeded,
        "PATTERN_TIMEOUT",
        format!(
            "pattern {pattern:?} did not {what} for namespace {namespace:?} within {}; retry, \
             or raise the client deadline / `request_timeout`",
            humantime::format_duration(deadline)
        ),
    )
    .meta("pattern", pattern)
    .into()
}

/// The upstream call's messages as the downstream stream. Dropping it drops
/// the upstream call.
struct Forward {
    /// `None` once the stream has ended.
    upstream: Option<Streaming<Message>>,
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    namespace: String,
    pattern: String,
}

impl Stream for Forward {
    type Item = Result<Message, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(upstream) = this.upstream.as_mut() else {
            return Poll::Ready(None);
        };
        if this.stopping.as_mut().poll(cx).is_ready() {
            this.upstream = None;
            return Poll::Ready(Some(Err(ApiError::new(
                Code::Unavailable,
                "PROXY_SHUTTING_DOWN",
                "the proxy is shutting down, so this subscription ended; subscribe again once \
                 it is back (messages published in between are not delivered)",
            )
            .into())));
        }
        match Pin::new(upstream).poll_next(cx) {
            Poll::Ready(Some(Ok(m))) => Poll::Ready(Some(Ok(m))),
            Poll::Ready(Some(Err(status))) => {
                this.upstream = None;
                Poll::Ready(Some(Err(annotate(status, &this.namespace, &this.pattern))))
            }
            // A pattern never ends a subscription without a status; if the
            // connection closed cleanly anyway, say so rather than pretend
            // the topic ended.
            Poll::Ready(None) => {
                this.upstream = None;
                Poll::Ready(Some(Err(annotate(
                    Status::unavailable("the subscription stream ended without a status"),
                    &this.namespace,
                    &this.pattern,
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[tonic::async_trait]
impl PubSub for PubSubProxy {
    async fn publish(
        &self,
        req: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let deadline = self.deadline(&req);
        let ns = req.get_ref().namespace.clone();
        let target = self.route(&ns)?;
        let metadata = forwarded_metadata(req.metadata());
        let mut outgoing =
            Request::from_parts(metadata, tonic::Extensions::default(), req.into_inner());
        outgoing.set_timeout(deadline);
        let mut client = PubSubClient::new(target.channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        match tokio::time::timeout(deadline, client.publish(outgoing)).await {
            Ok(Ok(resp)) => Ok(Response::new(resp.into_inner())),
            Ok(Err(status)) => Err(annotate(status, &ns, &target.pattern)),
            Err(_) => Err(timed_out(&ns, &target.pattern, "answer", deadline)),
        }
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<Message, Status>> + Send>>;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // Only opening the subscription is bounded; no grpc-timeout goes
        // upstream, so the stream lives until one side ends it.
        let deadline = self.deadline(&req);
        let ns = req.get_ref().namespace.clone();
        let target = self.route(&ns)?;
        let metadata = forwarded_metadata(req.metadata());
        let outgoing =
            Request::from_parts(metadata, tonic::Extensions::default(), req.into_inner());
        let mut client = PubSubClient::new(target.channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let upstream = match tokio::time::timeout(deadline, client.subscribe(outgoing)).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(status)) => return Err(annotate(status, &ns, &target.pattern)),
            Err(_) => {
                return Err(timed_out(
                    &ns,
                    &target.pattern,
                    "open the subscription",
                    deadline,
                ));
            }
        };
        let mut stopping = self.stopping.clone();
        Ok(Response::new(Box::pin(Forward {
            upstream: Some(upstream),
            stopping: Box::pin(async move {
                // An error means the proxy is gone: end the stream too.
                let _ = stopping.wait_for(|down| *down).await;
            }),
            namespace: ns,
            pattern: target.pattern,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(interfaces: &[&str]) -> Target {
        Target {
            pattern: "kv".into(),
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn not_implemented_names_the_pattern_and_its_interfaces() {
        let err = not_implemented("default", &target(&["trellis.data.v1.KeyValue"]));
        assert_eq!(err.code(), Code::Unimplemented);
        for want in [
            "\"default\"",
            "\"kv\"",
            "trellis.data.v1.KeyValue",
            "trellis.data.v1.PubSub",
        ] {
            assert!(err.message().contains(want), "{want}: {}", err.message());
        }
        let err = not_implemented("default", &target(&[]));
        assert!(
            err.message().contains("no data interface"),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn an_unknown_namespace_is_not_found() {
        let (_tx, rx) = watch::channel(false);
        let proxy = PubSubProxy::new(Router::new(&[]), Duration::from_secs(1), rx);
        let req = Request::new(PublishRequest {
            namespace: "nope".into(),
            topic: "t".into(),
            payload: vec![],
            attributes: Default::default(),
        });
        let err = proxy.publish(req).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let req = Request::new(SubscribeRequest {
            namespace: "nope".into(),
            topic: "t".into(),
            queue_group: String::new(),
        });
        let err = proxy.subscribe(req).await.err().unwrap();
        assert_eq!(err.code(), Code::NotFound);
    }
}
