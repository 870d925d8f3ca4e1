//! `trellis.data.v1.PubSub` over gRPC, for any [`PubSub`] pattern: validate,
//! find the started pattern, call it, convert the answer. A subscription's
//! stream lives exactly as long as the call: when the client goes away tonic
//! drops the response stream, which drops the pattern's stream and with it
//! the backend subscription; when the pattern shuts down the stream ends
//! with `UNAVAILABLE`, so an open subscription never holds up a stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use trellis_proto::data::v1 as pb;
use trellis_proto::data::v1::pub_sub_server;

use crate::idempotency::{self, Once};
use crate::kv::{answered, request_span};
use crate::lifecycle::Slot;
use crate::observe::{Metrics, OpenSubscription};
use crate::shutdown::Shutdown;
use crate::{Error, Message, MessageStream, PubSub, validate};

/// The generated `PubSub` server trait, implemented by delegating to `P`.
pub(crate) struct PubSubService<P> {
    slot: Arc<Slot<P>>,
    shutdown: Shutdown,
    /// Counts open subscriptions (`pattern_subscriptions`).
    metrics: Arc<Metrics>,
}

impl<P: PubSub> PubSubService<P> {
    pub(crate) fn new(slot: Arc<Slot<P>>, shutdown: Shutdown, metrics: Arc<Metrics>) -> Self {
        metrics.serves_pub_sub();
        Self {
            slot,
            shutdown,
            metrics,
        }
    }

    async fn publish_message(
        &self,
        req: pb::PublishRequest,
        once: Option<Once>,
    ) -> Result<(pb::PublishResponse, bool), Error> {
        let args = validate::publish(req)?;
        let pattern = self.slot.running()?;
        let (message_id, replayed) = match once {
            None => {
                let id = pattern
                    .publish(&args.namespace, &args.topic, args.payload, args.attributes)
                    .await?;
                (id, false)
            }
            Some(once) => {
                let outcome = pattern
                    .publish_once(
                        &args.namespace,
                        &args.topic,
                        args.payload,
                        args.attributes,
                        &once,
                    )
                    .await?;
                idempotency::settle(outcome, &once.key)?
            }
        };
        Ok((pb::PublishResponse { message_id }, replayed))
    }

    async fn open_subscription(&self, req: pb::SubscribeRequest) -> Result<Subscription, Error> {
        let args = validate::subscribe(req)?;
        let pattern = self.slot.running()?;
        let what = match &args.queue_group {
            Some(group) => format!(
                "topic {:?} in namespace {:?} (queue group {group:?})",
                args.topic, args.namespace
            ),
            None => format!("topic {:?} in namespace {:?}", args.topic, args.namespace),
        };
        let stream = pattern
            .subscribe(&args.namespace, &args.topic, args.queue_group)
            .await?;
        tracing::debug!(subscription = %what, "subscribed");
        let open = self.metrics.subscription();
        Ok(Subscription::new(stream, self.shutdown.clone(), what, open))
    }
}

/// A pattern's message stream as the gRPC response stream: messages are
/// converted, the first error ends it, and shutdown ends it with
/// `UNAVAILABLE`. Dropping it drops the pattern's stream.
struct Subscription {
    /// `None` once the stream has ended.
    inner: Option<MessageStream>,
    /// Counted as open while `inner` lives.
    open: Option<OpenSubscription>,
    shutdown: Pin<Box<dyn Future<Output = Duration> + Send>>,
    /// What is subscribed to, for messages and logs.
    what: String,
}

impl Subscription {
    fn new(inner: MessageStream, shutdown: Shutdown, what: String, open: OpenSubscription) -> Self {
        Self {
            inner: Some(inner),
            open: Some(open),
            shutdown: Box::pin(async move { shutdown.requested().await }),
            what,
        }
    }

    /// Ends the stream with `err`, dropping the pattern's stream first.
    fn end(&mut self, err: Error) -> Poll<Option<Result<pb::Message, Status>>> {
        self.inner = None;
        self.open = None;
        tracing::debug!(subscription = %self.what, error = %err, "subscription ended");
        Poll::Ready(Some(Err(Status::from(err))))
    }
}

impl Stream for Subscription {
    type Item = Result<pb::Message, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.shutdown.as_mut().poll(cx).is_ready() {
            return this.end(Error::unavailable(
                "the pattern is shutting down, so this subscription ended; subscribe again \
                 (messages published in between are not delivered)",
            ));
        }
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => Poll::Ready(Some(Ok(to_proto(message)))),
            Poll::Ready(Some(Err(err))) => this.end(err),
            Poll::Ready(None) => {
                let what = this.what.clone();
                this.end(Error::unavailable(format!(
                    "the backend ended the subscription to {what}; subscribe again \
                     (messages published in between are not delivered)"
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn to_proto(m: Message) -> pb::Message {
    pb::Message {
        message_id: m.message_id,
        topic: m.topic,
        payload: m.payload.into(),
        attributes: m.attributes.into_iter().collect(),
        publish_time: Some(prost_types::Timestamp::from(m.publish_time)),
    }
}

#[tonic::async_trait]
impl<P: PubSub> pub_sub_server::PubSub for PubSubService<P> {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let span = request_span(&request, "publish", "trellis.data.v1.PubSub/Publish");
        let once = idempotency::from_metadata(
            request.metadata(),
            "/trellis.data.v1.PubSub/Publish",
            || prost::Message::encode_to_vec(request.get_ref()),
        );
        let result = match once {
            Ok(once) => {
                self.publish_message(request.into_inner(), once)
                    .instrument(span.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        answered(&span, crate::kv::reply_once(result))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::Message, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // The span covers opening the subscription; the stream outlives it.
        let span = request_span(&request, "subscribe", "trellis.data.v1.PubSub/Subscribe");
        let opened = self
            .open_subscription(request.into_inner())
            .instrument(span.clone())
            .await
            .map(|s| Response::new(Box::pin(s) as Self::SubscribeStream))
            .map_err(Status::from);
        answered(&span, opened)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio_stream::StreamExt;
    use tonic::Code;
    use trellis_proto::data::v1::pub_sub_server::PubSub as _;

    use super::*;
    use crate::testing::TestPattern;
    use crate::{InitContext, Pattern};

    struct Fixture {
        svc: PubSubService<TestPattern>,
        slot: Arc<Slot<TestPattern>>,
        shutdown: Shutdown,
        metrics: Arc<Metrics>,
    }

    async fn started() -> Fixture {
        let slot = Arc::new(Slot::new());
        let pattern = TestPattern::init(serde_json::from_str("{}").unwrap(), InitContext::new("t"))
            .await
            .unwrap();
        slot.install_started(pattern);
        let shutdown = Shutdown::new();
        let metrics = Arc::new(Metrics::new());
        Fixture {
            svc: PubSubService::new(Arc::clone(&slot), shutdown.clone(), Arc::clone(&metrics)),
            slot,
            shutdown,
            metrics,
        }
    }

    fn publish_req(topic: &str, payload: &[u8]) -> Request<pb::PublishRequest> {
        Request::new(pb::PublishRequest {
            namespace: "ns".into(),
            topic: topic.into(),
            payload: payload.to_vec(),
            attributes: HashMap::from([("k".to_string(), "v".to_string())]),
        })
    }

    fn subscribe_req(topic: &str) -> Request<pb::SubscribeRequest> {
        Request::new(pb::SubscribeRequest {
            namespace: "ns".into(),
            topic: topic.into(),
            queue_group: String::new(),
        })
    }

    #[tokio::test]
    async fn calls_before_start_are_unavailable_and_validation_comes_first() {
        let svc = PubSubService::<TestPattern>::new(
            Arc::new(Slot::new()),
            Shutdown::new(),
            Arc::new(Metrics::new()),
        );
        let err = svc.publish(publish_req("t", b"x")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        let err = svc.subscribe(subscribe_req("t")).await.err().unwrap();
        assert_eq!(err.code(), Code::Unavailable);
        let err = svc
            .subscribe(subscribe_req("bad topic"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("topic: "), "{}", err.message());
    }

    #[tokio::test]
    async fn a_subscriber_receives_what_is_published_after_it_subscribed() {
        let f = started().await;
        let mut stream = f
            .svc
            .subscribe(subscribe_req("t"))
            .await
            .unwrap()
            .into_inner();
        let id = f
            .svc
            .publish(publish_req("t", b"hello"))
            .await
            .unwrap()
            .into_inner()
            .message_id;
        let m = stream.next().await.unwrap().unwrap();
        assert_eq!(m.message_id, id);
        assert_eq!(m.topic, "t");
        assert_eq!(m.payload, b"hello");
        assert_eq!(m.attributes["k"], "v");
        assert!(m.publish_time.is_some());
    }

    #[tokio::test]
    async fn dropping_the_response_stream_drops_the_backend_subscription() {
        let f = started().await;
        let pattern = f.slot.running().unwrap();
        let stream = f
            .svc
            .subscribe(subscribe_req("t"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pattern.subscribers(), 1);
        drop(stream);
        assert_eq!(pattern.subscribers(), 0);
    }

    #[tokio::test]
    async fn shutdown_ends_the_stream_with_unavailable() {
        let f = started().await;
        let pattern = f.slot.running().unwrap();
        let mut stream = f
            .svc
            .subscribe(subscribe_req("t"))
            .await
            .unwrap()
            .into_inner();
        f.shutdown.request(Duration::from_secs(5), "test");
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("shutting down"), "{}", err.message());
        assert_eq!(
            pattern.subscribers(),
            0,
            "backend subscription dropped at once"
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_backend_error_ends_the_stream_with_its_status() {
        let f = started().await;
        let mut stream = f
            .svc
            .subscribe(subscribe_req("t"))
            .await
            .unwrap()
            .into_inner();
        // The test pattern turns a "fail" payload into an error item.
        f.svc.publish(publish_req("t", b"fail")).await.unwrap();
        let err = stream.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(stream.next().await.is_none());
        assert_eq!(f.slot.running().unwrap().subscribers(), 0);
    }

    #[tokio::test]
    async fn open_subscriptions_are_counted_until_their_stream_ends() {
        let f = started().await;
        let open = |f: &Fixture| {
            let text = f.metrics.encode();
            text.lines()
                .find_map(|l| l.strip_prefix("pattern_subscriptions "))
                .map(str::to_string)
        };
        assert_eq!(
            open(&f).as_deref(),
            Some("0"),
            "exported by a PubSub service"
        );
        let first = f.svc.subscribe(subscribe_req("t")).await.unwrap();
        let mut second = f
            .svc
            .subscribe(subscribe_req("t"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(open(&f).as_deref(), Some("2"));
        drop(first);
        assert_eq!(open(&f).as_deref(), Some("1"));
        // Ended by the backend but not yet dropped by tonic: not open.
        f.svc.publish(publish_req("t", b"fail")).await.unwrap();
        assert!(second.next().await.unwrap().is_err());
        assert_eq!(open(&f).as_deref(), Some("0"));
    }

    #[tokio::test]
    async fn pattern_errors_are_converted() {
        let f = started().await;
        let err = f.svc.publish(publish_req("boom", b"x")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(!err.message().contains("secret"));
    }
}
