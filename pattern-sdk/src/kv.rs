//! `trellis.data.v1.KeyValue` over gRPC, for any [`KeyValue`] pattern:
//! validate, find the started pattern, call it, convert the answer.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use trellis_proto::data::v1::key_value_server;
use trellis_proto::data::v1::{
    DeleteRequest, DeleteResponse, Entry, GetRequest, GetResponse, ListRequest, ListResponse,
    PutRequest, PutResponse,
};

use prost::Message;

use crate::idempotency::{self, Once};
use crate::lifecycle::Slot;
use crate::{Error, KeyValue, validate};

const PUT: &str = "/trellis.data.v1.KeyValue/Put";
const DELETE: &str = "/trellis.data.v1.KeyValue/Delete";

/// The generated `KeyValue` server trait, implemented by delegating to `P`.
pub(crate) struct KeyValueService<P> {
    slot: Arc<Slot<P>>,
}

impl<P: KeyValue> KeyValueService<P> {
    pub(crate) fn new(slot: Arc<Slot<P>>) -> Self {
        Self { slot }
    }

    async fn get_value(&self, req: GetRequest) -> Result<GetResponse, Error> {
        let args = validate::get(req)?;
        let pattern = self.slot.running()?;
        match pattern.get(&args.namespace, &args.key).await? {
            Some(value) => Ok(GetResponse {
                value: value.into(),
            }),
            None => Err(Error::not_found(format!(
                "key {:?} in namespace {:?} (it was never set, was deleted, or expired)",
                args.key, args.namespace
            ))),
        }
    }

    /// The answer, and whether it is an idempotent replay.
    async fn put_value(
        &self,
        req: PutRequest,
        once: Option<Once>,
    ) -> Result<(PutResponse, bool), Error> {
        let args = validate::put(req)?;
        let pattern = self.slot.running()?;
        let replayed = match once {
            None => {
                pattern
                    .put(&args.namespace, &args.key, args.value, args.ttl)
                    .await?;
                false
            }
            Some(once) => {
                let outcome = pattern
                    .put_once(&args.namespace, &args.key, args.value, args.ttl, &once)
                    .await?;
                idempotency::settle(outcome, &once.key)?.1
            }
        };
        Ok((PutResponse {}, replayed))
    }

    async fn delete_key(
        &self,
        req: DeleteRequest,
        once: Option<Once>,
    ) -> Result<(DeleteResponse, bool), Error> {
        let args = validate::delete(req)?;
        let pattern = self.slot.running()?;
        let (deleted, replayed) = match once {
            None => (pattern.delete(&args.namespace, &args.key).await?, false),
            Some(once) => {
                let outcome = pattern
                    .delete_once(&args.namespace, &args.key, &once)
                    .await?;
                idempotency::settle(outcome, &once.key)?
            }
        };
        Ok((DeleteResponse { deleted }, replayed))
    }

    async fn list_page(&self, req: ListRequest) -> Result<ListResponse, Error> {
        let args = validate::list(req)?;
        let pattern = self.slot.running()?;
        let page = pattern.list(&args.namespace, args.query).await?;
        Ok(ListResponse {
            entries: page
                .entries
                .into_iter()
                .map(|(key, value)| Entry {
                    key,
                    value: value.into(),
                })
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }
}

fn reply<T>(result: Result<T, Error>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

/// A write's answer, marked `idempotent-replayed: true` when it is a replay.
pub(crate) fn reply_once<T>(result: Result<(T, bool), Error>) -> Result<Response<T>, Status> {
    let (value, replayed) = result.map_err(Status::from)?;
    let mut response = Response::new(value);
    if replayed {
        idempotency::mark_replayed(&mut response);
    }
    Ok(response)
}

#[tonic::async_trait]
impl<P: KeyValue> key_value_server::KeyValue for KeyValueService<P> {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let span = request_span(&request, "get", "trellis.data.v1.KeyValue/Get");
        let result = self
            .get_value(request.into_inner())
            .instrument(span.clone())
            .await;
        answered(&span, reply(result))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let span = request_span(&request, "put", "trellis.data.v1.KeyValue/Put");
        let once = idempotency::from_metadata(request.metadata(), PUT, || {
            request.get_ref().encode_to_vec()
        });
        let result = match once {
            Ok(once) => {
                self.put_value(request.into_inner(), once)
                    .instrument(span.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        answered(&span, reply_once(result))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let span = request_span(&request, "delete", "trellis.data.v1.KeyValue/Delete");
        let once = idempotency::from_metadata(request.metadata(), DELETE, || {
            request.get_ref().encode_to_vec()
        });
        let result = match once {
            Ok(once) => {
                self.delete_key(request.into_inner(), once)
                    .instrument(span.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        answered(&span, reply_once(result))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let span = request_span(&request, "list", "trellis.data.v1.KeyValue/List");
        let result = self
            .list_page(request.into_inner())
            .instrument(span.clone())
            .await;
        answered(&span, reply(result))
    }
}

/// The span of one data call. It carries the caller's `x-request-id` (set
/// by the proxy on every call) and trace id, so whatever the pattern logs
/// while serving it can be matched with the proxy's log and the client's
/// error; and, when traces are exported, it is the call's server span,
/// continuing the proxy's trace (see `traces`).
pub(crate) fn request_span<T>(
    request: &Request<T>,
    method: &'static str,
    rpc_method: &'static str,
) -> tracing::Span {
    let id = request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let span = tracing::info_span!(
        "request",
        method,
        request_id = id,
        trace_id = crate::traces::trace_id(request.metadata()),
        otel.name = rpc_method,
        otel.kind = "server",
        rpc.system.name = "grpc",
        rpc.method = rpc_method,
        rpc.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    crate::traces::continue_trace(&span, request.metadata());
    span
}

/// Notes a call's status code on its span, and passes the answer on.
pub(crate) fn answered<T>(
    span: &tracing::Span,
    answer: Result<Response<T>, Status>,
) -> Result<Response<T>, Status> {
    let code = match &answer {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    span.record("rpc.response.status_code", trellis_proto::code_name(code));
    if matches!(
        code,
        tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unimplemented
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
    answer
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use trellis_proto::data::v1::key_value_server::KeyValue as _;

    use super::*;
    use crate::testing::TestPattern;
    use crate::{InitContext, Pattern};

    /// A service whose pattern has not been initialized.
    fn not_started() -> KeyValueService<TestPattern> {
        KeyValueService::new(Arc::new(Slot::new()))
    }

    /// A service whose pattern has been initialized and started.
    async fn started() -> KeyValueService<TestPattern> {
        let slot = Arc::new(Slot::new());
        let pattern = TestPattern::init(serde_json::from_str("{}").unwrap(), InitContext::new("t"))
            .await
            .unwrap();
        slot.install_started(pattern);
        KeyValueService::new(slot)
    }

    fn get_req(ns: &str, key: &str) -> Request<GetRequest> {
        Request::new(GetRequest {
            namespace: ns.into(),
            key: key.into(),
        })
    }

    fn put_req(ns: &str, key: &str, value: &[u8]) -> Request<PutRequest> {
        Request::new(PutRequest {
            namespace: ns.into(),
            key: key.into(),
            value: value.to_vec(),
            ttl: None,
        })
    }

    #[tokio::test]
    async fn data_call_before_start_is_unavailable() {
        let svc = not_started();
        let err = svc.get(get_req("ns", "k")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(
            err.message().contains("pattern not started yet"),
            "{}",
            err.message()
        );
        let err = svc.put(put_req("ns", "k", b"v")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }

    #[tokio::test]
    async fn validation_comes_first() {
        let err = not_started().get(get_req("", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("namespace: "),
            "{}",
            err.message()
        );
    }

    #[tokio::test]
    async fn round_trip_through_the_pattern() {
        let svc = started().await;
        svc.put(put_req("ns", "a", b"1")).await.unwrap();
        let got = svc.get(get_req("ns", "a")).await.unwrap().into_inner();
        assert_eq!(got.value, b"1");

        let list = svc
            .list(Request::new(ListRequest {
                namespace: "ns".into(),
                prefix: String::new(),
                page_size: 0,
                page_token: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.entries.len(), 1);
        assert_eq!(list.entries[0].key, "a");
        assert_eq!(list.next_page_token, "");

        let del = Request::new(DeleteRequest {
            namespace: "ns".into(),
            key: "a".into(),
        });
        assert!(svc.delete(del).await.unwrap().into_inner().deleted);
        let del = Request::new(DeleteRequest {
            namespace: "ns".into(),
            key: "a".into(),
        });
        assert!(!svc.delete(del).await.unwrap().into_inner().deleted);
    }

    #[tokio::test]
    async fn missing_key_is_not_found_naming_key_and_namespace() {
        let svc = started().await;
        let err = svc.get(get_req("ns", "nope")).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("\"nope\""), "{}", err.message());
        assert!(err.message().contains("\"ns\""), "{}", err.message());
    }

    #[tokio::test]
    async fn pattern_errors_are_converted() {
        let svc = started().await;
        let err = svc.put(put_req("ns", "boom", b"v")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(!err.message().contains("secret"));
    }
}
