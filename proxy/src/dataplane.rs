//! The data plane: routes each `KeyValue` call by namespace to the pattern
//! that owns it and forwards it with a deadline. Errors name what happened
//! and what to do; they become `Status` here, at the edge.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::key_value_server::KeyValue;
use trellis_proto::data::v1::*;

use crate::error::ApiError;
use crate::supervisor::{PatternHandle, State};
use tonic::Code;

/// Namespace → pattern.
#[derive(Clone)]
pub struct Router {
    routes: HashMap<String, PatternHandle>,
}

/// Where one call goes.
pub struct Target {
    pub pattern: String,
    pub channel: Channel,
    /// The data services the pattern said it implements.
    pub interfaces: Vec<String>,
}

impl Router {
    pub fn new(patterns: &[PatternHandle]) -> Self {
        let routes = patterns
            .iter()
            .flat_map(|p| p.namespaces().iter().map(move |ns| (ns.clone(), p.clone())))
            .collect();
        Router { routes }
    }

    /// The pattern serving `namespace`, if it is routable now.
    pub fn route(&self, namespace: &str) -> Result<Target, Status> {
        if namespace.is_empty() {
            return Err(ApiError::invalid_argument(
                "namespace",
                "must not be empty; set it to one of the configured namespaces",
            )
            .into());
        }
        let Some(handle) = self.routes.get(namespace) else {
            let mut known: Vec<&str> = self.routes.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(ApiError::new(
                Code::NotFound,
                "NAMESPACE_NOT_FOUND",
                format!(
                    "namespace {namespace:?} is not configured; known namespaces: {}. Use one of \
                     them, or add it under `namespaces:` in the proxy config",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
            .meta("namespace", namespace)
            .into());
        };
        let status = handle.status();
        match (status.state, status.channel) {
            (State::Serving, Some(channel)) => Ok(Target {
                pattern: handle.name().to_string(),
                channel,
                interfaces: status.interfaces,
            }),
            (state, _) => {
                let why = status
                    .last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                Err(ApiError::new(
                    Code::Unavailable,
                    "PATTERN_UNAVAILABLE",
                    format!(
                        "namespace {namespace:?} is served by pattern {:?}, which is {state}{why}; \
                         retry with backoff, and see `trellis patterns` for its state",
                        handle.name()
                    ),
                )
                .meta("namespace", namespace)
                .meta("pattern", handle.name())
                .meta("state", state.as_str())
                .into())
            }
        }
    }
}

/// The proxy's `trellis.data.v1.KeyValue`.
pub struct KeyValueProxy {
    router: Router,
    request_timeout: Duration,
}

impl KeyValueProxy {
    pub fn new(router: Router, request_timeout: Duration) -> Self {
        KeyValueProxy {
            router,
            request_timeout,
        }
    }

    /// Forwards one unary call: routes, applies the deadline (the client's
    /// `grpc-timeout` if shorter than `request_timeout`), calls, and puts the
    /// pattern's name on transport errors.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        namespace: impl FnOnce(&Req) -> &str,
        req: Request<Req>,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(KeyValueClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let deadline = client_deadline(&req)
            .map(|d| d.min(self.request_timeout))
            .unwrap_or(self.request_timeout);
        let ns = namespace(req.get_ref()).to_string();
        let target = self.router.route(&ns)?;
        let metadata = forwarded_metadata(req.metadata());
        let mut outgoing =
            Request::from_parts(metadata, tonic::Extensions::default(), req.into_inner());
        outgoing.set_timeout(deadline);
        let client = KeyValueClient::new(target.channel);
        match tokio::time::timeout(deadline, call(client, outgoing)).await {
            Ok(Ok(resp)) => Ok(Response::new(resp.into_inner())),
            Ok(Err(status)) => Err(annotate(status, &ns, &target.pattern)),
            Err(_) => Err(ApiError::new(
                Code::DeadlineExceeded,
                "PATTERN_TIMEOUT",
                format!(
                    "pattern {:?} did not answer for namespace {ns:?} within {}; retry, or raise \
                     the client deadline / `request_timeout`",
                    target.pattern,
                    humantime::format_duration(deadline)
                ),
            )
            .meta("pattern", target.pattern.clone())
            .into()),
        }
    }
}

/// Errors the pattern produced pass through unchanged; failures to reach it
/// say which pattern and what to do.
pub fn annotate(status: Status, namespace: &str, pattern: &str) -> Status {
    // A status the pattern built itself (the SDK attaches ErrorInfo) is its
    // answer and passes through untouched.
    if tonic_types::StatusExt::get_details_error_info(&status).is_some() {
        return status;
    }
    let transport = status.code() == Code::Unknown
        && ["transport", "connection", "broken pipe", "h2 protocol"]
            .iter()
            .any(|w| status.message().to_ascii_lowercase().contains(w));
    if status.code() == Code::Unavailable || transport {
        ApiError::new(
            Code::Unavailable,
            "PATTERN_UNAVAILABLE",
            format!(
                "pattern {pattern:?} (namespace {namespace:?}) is unavailable: {}; retry with backoff",
                status.message()
            ),
        )
        .meta("namespace", namespace)
        .meta("pattern", pattern)
        .into()
    } else {
        status
    }
}

/// Metadata passed on to the pattern: the caller's own (request id, trace
/// context, authorization, custom keys), never transport or gRPC-internal
/// headers. A request without `x-request-id` gets one, so every call a
/// pattern sees can be found in the proxy's log.
pub fn forwarded_metadata(incoming: &tonic::metadata::MetadataMap) -> tonic::metadata::MetadataMap {
    use tonic::metadata::KeyAndValueRef;
    const DROP: &[&str] = &[
        "te",
        "content-type",
        "user-agent",
        "host",
        "connection",
        "keep-alive",
        "upgrade",
        "transfer-encoding",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
    ];
    let mut out = tonic::metadata::MetadataMap::new();
    for kv in incoming.iter() {
        match kv {
            KeyAndValueRef::Ascii(k, v) => {
                let name = k.as_str();
                if !name.starts_with("grpc-") && !DROP.contains(&name) {
                    out.append(k.clone(), v.clone());
                }
            }
            KeyAndValueRef::Binary(k, v) => {
                if !k.as_str().starts_with("grpc-") {
                    out.append_bin(k.clone(), v.clone());
                }
            }
        }
    }
    if !out.contains_key(crate::gateway::headers::REQUEST_ID)
        && let Ok(v) = uuid::Uuid::new_v4().to_string().parse()
    {
        out.insert(crate::gateway::headers::REQUEST_ID, v);
    }
    out
}

/// The deadline a gRPC client sent, from its `grpc-timeout` header.
pub fn client_deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(v)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl KeyValue for KeyValueProxy {
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.forward(
            |r: &GetRequest| &r.namespace,
            req,
            |mut c, r| async move { c.get(r).await },
        )
        .await
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.forward(
            |r: &PutRequest| &r.namespace,
            req,
            |mut c, r| async move { c.put(r).await },
        )
        .await
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        self.forward(
            |r: &DeleteRequest| &r.namespace,
            req,
            |mut c, r| async move { c.delete(r).await },
        )
        .await
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        self.forward(
            |r: &ListRequest| &r.namespace,
            req,
            |mut c, r| async move { c.list(r).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_namespace_lists_the_known_ones() {
        let router = Router {
            routes: HashMap::new(),
        };
        let err = router.route("nope").err().unwrap();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.message().contains("\"nope\""), "{}", err.message());
        let empty = router.route("").err().unwrap();
        assert_eq!(empty.code(), tonic::Code::InvalidArgument);
    }
}
