//! The HTTP/JSON gateway: every `google.api.http`-annotated method of the
//! proxy's gRPC services, over HTTP/1.1 and h2c, transcoded by one generic
//! engine. Only this module knows about HTTP.
//!
//! - `template`: path templates; `routes`: the table from the descriptors.
//! - `transcode`: HTTP ↔ protobuf JSON; `codec`: dynamic messages for tonic.
//! - `headers`: request id, trace context, configured header mapping.
//! - `problem`: errors as RFC 9457 problem+json.
//! - `openapi`: the OpenAPI 3 document from the same descriptors.
//! - `metrics`: `http_server_request_duration_seconds` and `GET /metrics`.
//! - `mixed`: the admin door, gRPC and HTTP/JSON on one listener.
//!
//! A request's path: limits (URI 414, headers 431) → route (404/405/400) →
//! content type (415) → body with size and time limits (413/408) →
//! transcode (400) → an in-process gRPC call on the same `FrontDoor` the gRPC
//! listener serves (so both front doors run exactly the same code) → JSON,
//! NDJSON or Server-Sent Events.

pub mod codec;
pub mod headers;
pub mod metrics;
pub mod mixed;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod template;
pub mod transcode;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use prost_reflect::{DescriptorPool, DynamicMessage};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::Code;
use tracing::{info, warn};

use crate::config::{HeaderMapping, Http, HttpLimits};
use crate::error::ApiError;
use codec::DynamicCodec;
use metrics::{HttpMetrics, RouteId};
pub use routes::Api;
use routes::{Lookup, Route, RouteTable};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// How a streaming response is framed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StreamFormat {
    /// `application/x-ndjson`: `{"result": …}` per line, `{"error": …}` last.
    NdJson,
    /// `text/event-stream`: `data:` events, `event: error` last.
    Sse,
}

/// Per-request facts carried into every response and log line.
struct Ctx {
    request_id: String,
    trace_id: Option<String>,
    path: String,
    /// The client's address (for per-caller rate limits).
    peer: Option<crate::dataplane::Peer>,
    /// The name in the connection's client certificate (mutual TLS).
    cert: Option<crate::access::CertIdentity>,
    /// The client's deadline, from a `Grpc-Timeout` header (as
    /// grpc-gateway reads it).
    timeout: Option<std::time::Duration>,
}

pub struct Gateway {
    table: RouteTable,
    grpc: crate::front::FrontDoor,
    limits: HttpLimits,
    headers: HeaderMapping,
    openapi: Bytes,
    /// The registry `GET /metrics` renders; `None` when metrics are off.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Where requests are counted; `None` when metrics are off.
    requests: Option<HttpMetrics>,
}

impl Gateway {
    /// The routes of `api` (and its own `/openapi.json`), over `grpc`,
    /// the front door of the same listener family: data calls become
    /// protobuf bytes once here and take the same forwarding path as gRPC
    /// ones. `metrics`: the proxy's registry (`None`: metrics are off, and
    /// `/metrics` says how to turn them on).
    pub fn new(
        api: Api,
        grpc: crate::front::FrontDoor,
        http: &Http,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Self, String> {
        let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| format!("the embedded descriptor set does not decode: {e}"))?;
        let table = RouteTable::from_pool(&pool)?.only(api);
        let openapi =
            Bytes::from(serde_json::to_vec_pretty(&openapi::document(&table)).unwrap_or_default());
        let requests = metrics
            .as_ref()
            .map(|m| HttpMetrics::new(m.http.clone(), &table));
        Ok(Gateway {
            table,
            grpc,
            limits: http.limits.clone(),
            headers: http.headers.clone(),
            openapi,
            metrics,
            requests,
        })
    }

    /// Answers one request. Never panics on input; every failure is a
    /// problem+json response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let ctx = Ctx {
            request_id: headers::request_id(req.headers()),
            trace_id: headers::trace_id(req.headers()),
            path: req.uri().path().to_string(),
            peer: req.extensions().get::<crate::dataplane::Peer>().copied(),
            cert: req
                .extensions()
                .get::<crate::access::CertIdentity>()
                .cloned(),
            timeout: req
                .headers()
                .get("grpc-timeout")
                .and_then(|v| crate::dataplane::wire::parse_grpc_timeout(v.as_bytes())),
        };
        let method = req.method().clone();
        let version = req.version();
        let mut route = RouteId::Unmatched;
        let mut resp = match self.dispatch(req, &ctx, &mut route).await {
            Ok(r) => r,
            Err(e) => self.problem(&e, &ctx),
        };
        if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && version < Version::HTTP_2 {
            // The body was not read to its end (see `read_body`): the
            // connection cannot carry another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            resp.headers_mut().insert(headers::REQUEST_ID, v);
        }
        info!(
            method = %method,
            path = %ctx.path,
            status = resp.status().as_u16(),
            ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = %ctx.request_id,
            "http request"
        );
        match &self.requests {
            Some(m) => m.record(resp, &method, route, started),
            None => resp,
        }
    }

    fn problem(&self, e: &ApiError, ctx: &Ctx) -> Response<Body> {
        if e.code == Code::Internal || e.code == Code::Unknown {
            warn!(request_id = %ctx.request_id, reason = %e.reason, detail = %e.message, "internal error");
        }
        problem::response(e, &ctx.path, &ctx.request_id, ctx.trace_id.as_deref()).map(full)
    }

    /// Answers `req`; sets `route` to the route that took it.
    async fn dispatch<B>(
        &self,
        req: Request<B>,
        ctx: &Ctx,
        route_id: &mut RouteId,
    ) -> Result<Response<Body>, ApiError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let uri_len = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().len())
            .unwrap_or(0);
        if uri_len > self.limits.max_uri_bytes {
            return Err(ApiError::http(
                414,
                Code::InvalidArgument,
                "URI_TOO_LONG",
                format!(
                    "the request target is {uri_len} bytes; at most {} are allowed (http.limits.max_uri_bytes)",
                    self.limits.max_uri_bytes
                ),
            ));
        }
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let max_headers = self.limits.max_header_bytes.as_u64() as usize;
        if header_bytes > max_headers {
            return Err(ApiError::http(
                431,
                Code::InvalidArgument,
                "HEADERS_TOO_LARGE",
                format!(
                    "the request headers total {header_bytes} bytes; at most {max_headers} are allowed"
                ),
            ));
        }
        if ctx.path == "/metrics" {
            *route_id = RouteId::Metrics;
            return self.metrics(&req, ctx).await;
        }
        if req.method() == Method::GET && (ctx.path == "/livez" || ctx.path == "/readyz") {
            let (service, id) = if ctx.path == "/livez" {
                (crate::health::LIVENESS, RouteId::Livez)
            } else {
                ("", RouteId::Readyz)
            };
            *route_id = id;
            return Ok(self.probe(service).await);
        }
        if req.method() == Method::GET && ctx.path == "/openapi.json" {
            *route_id = RouteId::OpenApi;
            let mut r = Response::new(full(self.openapi.clone()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(r);
        }
        let (route, bindings) = match self.table.find(req.method(), &ctx.path) {
            Lookup::Found(r, b) => {
                *route_id = RouteId::Table(r.id);
                (r, b)
            }
            Lookup::MethodNotAllowed(allowed) => {
                let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
                let e = ApiError::http(
                    405,
                    Code::Unimplemented,
                    "METHOD_NOT_ALLOWED",
                    format!(
                        "{} is not allowed on {}; allowed: {}",
                        req.method(),
                        ctx.path,
                        allow.join(", ")
                    ),
                );
                let mut r = self.problem(&e, ctx);
                if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
                return Ok(r);
            }
            Lookup::NotFound => {
                return Err(ApiError::http(
                    404,
                    Code::NotFound,
                    "ROUTE_NOT_FOUND",
                    format!(
                        "no API route matches {} {}; see /openapi.json for the routes",
                        req.method(),
                        ctx.path
                    ),
                ));
            }
            Lookup::BadPath(r, template::PathError::DotSegment) => {
                *route_id = RouteId::Table(r.id);
                return Err(ApiError::http(
                    400,
                    Code::InvalidArgument,
                    "DOT_SEGMENT",
                    "the path has a '.' or '..' segment; such keys cannot be addressed over HTTP (clients \
                     and proxies rewrite them) — use the gRPC API for them",
                ));
            }
            Lookup::BadPath(r, template::PathError::BadValue { field, problem }) => {
                *route_id = RouteId::Table(r.id);
                return Err(ApiError::invalid_argument(&field, problem));
            }
        };
        let stream_format = match req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
        {
            Some(a) if a.contains("text/event-stream") => StreamFormat::Sse,
            _ => StreamFormat::NdJson,
        };
        let query = req.uri().query().map(str::to_string);
        if let Some(v) = req.headers().get(trellis_proto::idempotency::KEY)
            && v.to_str().ok().and_then(headers::idempotency_key).is_none()
        {
            return Err(ApiError::invalid_argument(
                "Idempotency-Key",
                "is not a structured-field string (\"…\", with \\\" and \\\\ escapes) nor a bare token",
            ));
        }
        let metadata =
            headers::to_metadata(req.headers(), &ctx.request_id, &ctx.path, &self.headers);
        let body = self.read_body(req).await?;
        let message = transcode::request(
            route,
            &bindings,
            query.as_deref(),
            &body,
            self.limits.max_json_depth,
        )?;
        self.call(route, metadata, message, stream_format, ctx)
            .await
    }

    /// `GET /metrics`: the Prometheus exposition, in OpenMetrics when the
    /// `Accept` header asks for it. Not an API route (not in OpenAPI).
    async fn metrics<B>(&self, req: &Request<B>, ctx: &Ctx) -> Result<Response<Body>, ApiError> {
        if req.method() != Method::GET {
            let e = ApiError::http(
                405,
                Code::Unimplemented,
                "METHOD_NOT_ALLOWED",
                format!("{} is not allowed on /metrics; allowed: GET", req.method()),
            );
            let mut r = self.problem(&e, ctx);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return Ok(r);
        }
        let Some(metrics) = &self.metrics else {
            return Err(ApiError::http(
                404,
                Code::NotFound,
                "METRICS_OFF",
                "metrics are turned off in this proxy's configuration; set `telemetry.metrics: \
                 true` (or TRELLIS_TELEMETRY__METRICS=true) and restart the proxy to serve them \
                 here",
            ));
        };
        let openmetrics = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(crate::metrics::wants_openmetrics);
        // Each pattern's own metrics, asked for now (bounded: 1 s), before
        // the proxy's are rendered, so this scrape's errors count in it.
        let patterns = metrics.from_patterns.scrape().await;
        let (content_type, mut text) = metrics.render(openmetrics);
        patterns.append_to(&mut text, openmetrics);
        let mut r = Response::new(full(text));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Ok(r)
    }

    async fn read_body<B>(&self, req: Request<B>) -> Result<Bytes, ApiError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max = self.limits.max_body.as_u64() as usize;
        // Over HTTP/1.1, a client may write its whole body before reading
        // (Python's urllib does): answering and closing with its body unread
        // makes the kernel reset the connection, and the client sees a broken
        // pipe instead of the 413. So a too-large body is read and discarded,
        // within `max_discard` and `read_timeout`, before answering (nginx's
        // "lingering close"). Not over HTTP/2 (RST_STREAM(NO_ERROR) after an
        // early answer is the protocol's way), nor when the client sent
        // `Expect: 100-continue` (it waits for the answer before sending).
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let linger = req.version() < Version::HTTP_2 && !expects_continue;
        let too_large = || {
            ApiError::http(
                413,
                Code::InvalidArgument,
                "BODY_TOO_LARGE",
                format!("the request body is larger than {max} bytes (http.limits.max_body)"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared.filter(|&n| n > max as u64) {
            // More than `max_discard`: the client gets a reset either way.
            if linger && n <= self.limits.max_discard.as_u64() {
                self.discard(req.into_body()).await;
            }
            return Err(too_large());
        }
        if declared != Some(0) && declared.is_some()
            || req.headers().contains_key(header::TRANSFER_ENCODING)
        {
            let ct = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            // JSON, or no type, or curl's `-d` default (form-urlencoded),
            // which grpc-gateway also reads as JSON; anything else is 415.
            let json_like = essence.is_empty()
                || essence == "application/json"
                || essence.ends_with("+json")
                || essence == "application/x-www-form-urlencoded";
            if !json_like {
                return Err(ApiError::http(
                    415,
                    Code::InvalidArgument,
                    "UNSUPPORTED_MEDIA_TYPE",
                    format!("the body must be JSON (Content-Type: application/json), not {ct:?}"),
                ));
            }
        }
        let mut body = req.into_body();
        let limited = Limited::new(&mut body, max);
        match tokio::time::timeout(self.limits.read_timeout, limited.collect()).await {
            Err(_) => Err(ApiError::http(
                408,
                Code::DeadlineExceeded,
                "REQUEST_TIMEOUT",
                format!(
                    "the request body did not arrive within {} (http.limits.read_timeout)",
                    humantime::format_duration(self.limits.read_timeout)
                ),
            )),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                if linger {
                    self.discard(body).await;
                }
                Err(too_large())
            }
            Ok(Err(e)) => Err(ApiError::http(
                400,
                Code::InvalidArgument,
                "BODY_UNREADABLE",
                format!("the request body could not be read: {e}"),
            )),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    /// Reads and drops the rest of a too-large body: at most `max_discard`
    /// bytes for at most `read_timeout`. Past either, the connection is
    /// closed with the rest unread.
    async fn discard<B>(&self, mut body: B)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let budget = self.limits.max_discard.as_u64();
        let drain = async {
            let mut read = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > budget {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(self.limits.read_timeout, drain).await;
    }

    /// `GET /livez` / `/readyz`: the health service `service` (through the
    /// same front door as gRPC), as Kubernetes-style plain text: 200 `ok`
    /// when SERVING, else 503.
    async fn probe(&self, service: &str) -> Response<Body> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.grpc.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map(|r| r.into_inner().status());
        let (code, text) = match status {
            Ok(ServingStatus::Serving) => (StatusCode::OK, "ok\n"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "not serving\n"),
        };
        let mut r = Response::new(full(text));
        *r.status_mut() = code;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }

    async fn call(
        &self,
        route: &Route,
        metadata: tonic::metadata::MetadataMap,
        message: DynamicMessage,
        format: StreamFormat,
        ctx: &Ctx,
    ) -> Result<Response<Body>, ApiError> {
        let mut grpc = tonic::client::Grpc::new(self.grpc.clone());
        grpc.ready().await.map_err(|e| {
            ApiError::new(
                Code::Unavailable,
                "GATEWAY_UNAVAILABLE",
                format!("the gRPC services are not ready: {e}"),
            )
        })?;
        let path = http::uri::PathAndQuery::from_maybe_shared(route.grpc_path.clone())
            .map_err(|e| ApiError::new(Code::Internal, "BAD_ROUTE", e.to_string()))?;
        let codec = DynamicCodec::new(route.method.output());
        let mut extensions = tonic::Extensions::default();
        if let Some(peer) = ctx.peer {
            extensions.insert(peer);
        }
        if let Some(cert) = &ctx.cert {
            extensions.insert(cert.clone());
        }
        let mut request = tonic::Request::from_parts(metadata, extensions, message);
        if let Some(t) = ctx.timeout {
            request.set_timeout(t);
        }

        if route.method.is_server_streaming() {
            let resp = grpc
                .server_streaming(request, path, codec)
                .await
                .map_err(|s| ApiError::from_status(&s))?;
            let mut out_headers = http::HeaderMap::new();
            headers::from_metadata(resp.metadata(), &ctx.path, &self.headers, &mut out_headers);
            let stream = resp.into_inner();
            let route = route.clone();
            let (rid, tid, instance) = (
                ctx.request_id.clone(),
                ctx.trace_id.clone(),
                ctx.path.clone(),
            );
            let frames = futures::stream::unfold(Some(stream), move |state| {
                let route = route.clone();
                let (rid, tid, instance) = (rid.clone(), tid.clone(), instance.clone());
                async move {
                    let mut stream = state?;
                    match stream.message().await {
                        Ok(Some(msg)) => {
                            let json = transcode::response(&route, &msg);
                            Some((frame(format, false, &json), Some(stream)))
                        }
                        Ok(None) => None,
                        Err(status) => {
                            let e = ApiError::from_status(&status);
                            let (_, doc) = problem::document(&e, &instance, &rid, tid.as_deref());
                            let json = serde_json::to_vec(&doc).unwrap_or_default();
                            Some((frame(format, true, &json), None))
                        }
                    }
                }
            })
            .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)));
            let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
            let ct = match format {
                StreamFormat::NdJson => "application/x-ndjson",
                StreamFormat::Sse => "text/event-stream",
            };
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r.headers_mut().extend(out_headers);
            return Ok(r);
        }

        let resp = grpc
            .unary(request, path, codec)
            .await
            .map_err(|s| ApiError::from_status(&s))?;
        let mut r = Response::new(full(transcode::response(route, resp.get_ref())));
        *r.status_mut() = StatusCode::OK;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers::from_metadata(resp.metadata(), &ctx.path, &self.headers, r.headers_mut());
        Ok(r)
    }
}

fn frame(format: StreamFormat, error: bool, json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 24);
    match format {
        StreamFormat::NdJson => {
            out.extend_from_slice(if error {
                b"{\"error\":"
            } else {
                b"{\"result\":"
            });
            out.extend_from_slice(json);
            out.extend_from_slice(b"}\n");
        }
        StreamFormat::Sse => {
            if error {
                out.extend_from_slice(b"event: error\n");
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(json);
            out.extend_from_slice(b"\n\n");
        }
    }
    Bytes::from(out)
}

/// What answers the requests of an HTTP listener: the [`Gateway`], or the
/// admin door ([`mixed::AdminDoor`]), which takes gRPC too.
pub trait Handler: Send + Sync + 'static {
    type Body: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;

    fn answer(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Response<Self::Body>> + Send;

    /// The limits of the listener's connections.
    fn limits(&self) -> &HttpLimits;
}

impl Handler for Gateway {
    type Body = Body;

    fn answer(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Response<Body>> + Send {
        self.handle(req)
    }

    fn limits(&self) -> &HttpLimits {
        &self.limits
    }
}

/// Serves HTTP/1.1 and h2c on `listener` until `closing` is cancelled, then
/// lets open requests finish for up to `grace`.
pub async fn serve<H: Handler>(
    handler: Arc<H>,
    listener: TcpListener,
    tls: Option<crate::tls::DoorTls>,
    closing: crate::shutdown::CancellationToken,
    grace: crate::shutdown::Grace,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let limits = handler.limits().clone();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = closing.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accepting an HTTP connection failed");
                    continue;
                }
            },
            _ = closing.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let header_buf = (limits.max_header_bytes.as_u64() as usize + limits.max_uri_bytes + 8192)
            .max(16 * 1024);
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.read_timeout)
            .max_buf_size(header_buf);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes.as_u64() as u32);
        let (watcher, tls, closing) = (graceful.watcher(), tls.clone(), closing.clone());
        // The handshake in the connection's task: a slow client holds up
        // no other.
        tokio::spawn(async move {
            let Some(stream) = crate::tls::open(tls.as_ref(), stream, peer, &closing).await else {
                return;
            };
            let cert = crate::access::of_stream(&stream);
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(crate::dataplane::Peer(peer));
                    if let Some(cert) = &cert {
                        req.extensions_mut().insert(cert.clone());
                    }
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler.answer(req).await) }
                });
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let _ = watcher.watch(conn).await;
            drop(permit);
        });
    }
    if !grace.bound(graceful.shutdown()).await {
        warn!("HTTP requests still open after shutdown_grace (or a second signal); closing anyway");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gateway() -> Gateway {
        // No patterns and no own services behind it: every routed call ends
        // NOT_FOUND or UNIMPLEMENTED, which is enough to drive the router,
        // limits and JSON codec with garbage.
        let routes = tonic::service::RoutesBuilder::default().routes();
        let data = crate::dataplane::DataPlane::new(
            crate::dataplane::Methods::from_descriptors().unwrap(),
            crate::dataplane::Router::new(&[]),
            crate::shutdown::CancellationToken::new(),
            std::sync::Arc::new(crate::dataplane::Telemetry::off()),
            crate::dataplane::Policies::defaults(),
            std::time::Duration::from_secs(1),
            10_000,
        );
        let metrics = crate::metrics::Metrics::new(&[], &[], None);
        Gateway::new(
            Api::Data,
            crate::front::FrontDoor::new(data, routes),
            &Http::default(),
            Some(std::sync::Arc::new(metrics)),
        )
        .unwrap()
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("v1".to_string()),
            Just("namespaces".to_string()),
            Just("keys".to_string()),
            Just("patterns".to_string()),
            Just("metrics".to_string()),
            Just("..".to_string()),
            Just("%2F".to_string()),
            Just("%00".to_string()),
            Just("%FF".to_string()),
            Just("%".to_string()),
            Just("a:watch".to_string()),
            "[a-zA-Z0-9%._~:@!$&'()*+,;=-]{0,12}",
        ]
    }

    fn request() -> impl Strategy<Value = (String, String, Vec<(String, String)>, Vec<u8>)> {
        (
            prop_oneof![Just("GET"), Just("PUT"), Just("POST"), Just("DELETE"), Just("PATCH")],
            proptest::collection::vec(segment(), 0..8),
            proptest::option::of("[a-zA-Z0-9=&%.+_-]{0,40}"),
            proptest::collection::vec(
                (
                    prop_oneof![Just("content-type"), Just("x-request-id"), Just("traceparent"), Just("accept"), Just("content-length")],
                    "[ -~]{0,40}",
                ),
                0..4,
            ),
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                "\\{(\"[a-zA-Z]{1,8}\":(\"[a-zA-Z0-9=]{0,8}\"|[0-9]{1,3}|true|null|\\[\\]|\\{\\}),?){0,4}\\}".prop_map(String::into_bytes),
            ],
        )
            .prop_map(|(m, segs, q, headers, body)| {
                let mut path = format!("/{}", segs.join("/"));
                if let Some(q) = q {
                    path.push('?');
                    path.push_str(&q);
                }
                let headers = headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                (m.to_string(), path, headers, body)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        /// Whatever arrives, the gateway answers with a well-formed response
        /// and never panics; every error is problem+json.
        #[test]
        fn never_panics_on_hostile_input((method, path, headers, body) in request()) {
            let gw = gateway();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let Ok(uri) = path.parse::<http::Uri>() else { return Ok(()) };
            let mut req = Request::builder().method(method.as_str()).uri(uri);
            for (k, v) in &headers {
                if let Ok(v) = HeaderValue::from_str(v) {
                    req = req.header(k.as_str(), v);
                }
            }
            let Ok(req) = req.body(Full::new(Bytes::from(body))) else { return Ok(()) };
            let resp = rt.block_on(gw.handle(req));
            let status = resp.status().as_u16();
            prop_assert!((200..600).contains(&status));
            if status >= 400 {
                prop_assert_eq!(resp.headers()[header::CONTENT_TYPE].to_str().unwrap(), problem::CONTENT_TYPE);
            }
            prop_assert!(resp.headers().contains_key(headers::REQUEST_ID));
        }

        /// The JSON codec alone, with arbitrary bytes as a Put body.
        #[test]
        fn transcoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let pool = DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).unwrap();
            let table = RouteTable::from_pool(&pool).unwrap();
            if let Lookup::Found(route, bindings) = table.find(&Method::PUT, "/v1/namespaces/n/keys/k") {
                let _ = transcode::request(route, &bindings, Some("a=%ZZ&&=="), &body, 32);
            }
        }
    }
}
