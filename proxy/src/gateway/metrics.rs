//! `http_server_request_duration_seconds` for the gateway, after the
//! OpenTelemetry HTTP semantic conventions in Prometheus form, and the
//! `GET /metrics` answer.
//!
//! Labels are bounded: `http_request_method` is one of the nine standard
//! methods or `_OTHER`; `http_route` is a route template from the table
//! (`/v1/namespaces/{namespace}/keys/{key}`), `/metrics`, `/openapi.json`,
//! or `_unmatched` for a request no route took (404, 405, and requests
//! refused before routing: 414, 431); `http_response_status_code` is the
//! status sent. Never a path, key or id.
//!
//! A request's duration runs from its arrival to the end of its response
//! body (or the client going away), so a stream counts whole, like
//! `rpc_server_call_duration_seconds`.
//!
//! The hot path takes no lock: each (route, method, status) the gateway
//! answers with has a slot holding its histogram once first used, found by
//! index; only a status outside [`STATUSES`] goes through the family's map.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Response};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use super::Body;
use super::routes::RouteTable;
use crate::metrics::histogram::AtomicHistogram;
use crate::metrics::{HttpHistograms, HttpLabels};

/// The `http_request_method` values: the standard methods (RFC 9110 and
/// PATCH), then `_OTHER` for anything else, as the conventions say.
const METHODS: [&str; 10] = [
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "_OTHER",
];

/// The statuses the gateway answers with (every `problem::http_status`, the
/// limits' 405/408/413/414/415/431, and 200); any other is still counted,
/// through the family's map.
const STATUSES: [u16; 18] = [
    200, 400, 401, 403, 404, 405, 408, 409, 413, 414, 415, 429, 431, 499, 500, 501, 503, 504,
];

/// The route label of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteId {
    /// A route of the table, by [`Route::id`](super::routes::Route::id).
    Table(usize),
    Metrics,
    OpenApi,
    Livez,
    Readyz,
    Unmatched,
}

pub struct HttpMetrics {
    family: HttpHistograms,
    /// The `http_route` value of each route id, then `/metrics`,
    /// `/openapi.json`, `/livez`, `/readyz`, `_unmatched`.
    routes: Vec<String>,
    /// `[route][method][status]`.
    slots: Box<[OnceLock<AtomicHistogram>]>,
}

impl HttpMetrics {
    pub fn new(family: HttpHistograms, table: &RouteTable) -> Self {
        let mut routes: Vec<String> = table
            .routes()
            .iter()
            .map(|r| r.template.openapi_path())
            .collect();
        routes.extend([
            "/metrics".into(),
            "/openapi.json".into(),
            "/livez".into(),
            "/readyz".into(),
            "_unmatched".into(),
        ]);
        let slots = (0..routes.len() * METHODS.len() * STATUSES.len())
            .map(|_| OnceLock::new())
            .collect();
        HttpMetrics {
            family,
            routes,
            slots,
        }
    }

    fn route_index(&self, route: RouteId) -> usize {
        let table = self.routes.len() - 5;
        match route {
            RouteId::Table(i) if i < table => i,
            RouteId::Table(_) | RouteId::Unmatched => table + 4,
            RouteId::Metrics => table,
            RouteId::OpenApi => table + 1,
            RouteId::Livez => table + 2,
            RouteId::Readyz => table + 3,
        }
    }

    /// The histogram a request of `method` on `route` answered with
    /// `status` goes to.
    fn histogram(&self, method: &Method, route: RouteId, status: u16) -> AtomicHistogram {
        let route = self.route_index(route);
        let method = method_index(method);
        let labels = || HttpLabels {
            http_request_method: METHODS[method],
            http_route: self.routes[route].clone(),
            http_response_status_code: status,
        };
        let Some(status) = STATUSES.iter().position(|&s| s == status) else {
            return self.family.get_or_create(&labels()).clone();
        };
        let slot = (route * METHODS.len() + method) * STATUSES.len() + status;
        match self.slots.get(slot) {
            Some(cell) => cell
                .get_or_init(|| self.family.get_or_create(&labels()).clone())
                .clone(),
            None => self.family.get_or_create(&labels()).clone(),
        }
    }

    /// Wraps `resp`'s body so the request is recorded when the body ends
    /// or is dropped.
    pub fn record(
        &self,
        resp: Response<Body>,
        method: &Method,
        route: RouteId,
        started: Instant,
    ) -> Response<Body> {
        let histogram = self.histogram(method, route, resp.status().as_u16());
        resp.map(|inner| {
            Timed {
                inner,
                done: Some((histogram, started)),
            }
            .boxed_unsync()
        })
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::CONNECT => 0,
        Method::DELETE => 1,
        Method::GET => 2,
        Method::HEAD => 3,
        Method::OPTIONS => 4,
        Method::PATCH => 5,
        Method::POST => 6,
        Method::PUT => 7,
        Method::TRACE => 8,
        _ => 9,
    }
}

/// A response body that records its request's duration once: at its end,
/// or when dropped first (the client went away, or hyper needed no more
/// polls after the last frame).
struct Timed {
    inner: Body,
    done: Option<(AtomicHistogram, Instant)>,
}

impl Timed {
    fn finish(&mut self) {
        if let Some((histogram, started)) = self.done.take() {
            histogram.observe(started.elapsed().as_secs_f64());
        }
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() {
            self.finish();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::registry::Registry;

    fn recorder() -> (HttpMetrics, Registry, RouteTable) {
        let pool =
            prost_reflect::DescriptorPool::decode(trellis_proto::FILE_DESCRIPTOR_SET).unwrap();
        let table = RouteTable::from_pool(&pool).unwrap();
        let family: HttpHistograms = Family::new_with_constructor(AtomicHistogram::seconds);
        let mut registry = Registry::default();
        registry.register("http_server_request_duration_seconds", "h", family.clone());
        (HttpMetrics::new(family, &table), registry, table)
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[tokio::test]
    async fn a_request_is_counted_under_its_template_when_its_body_ends() {
        let (m, registry, table) = recorder();
        let get = match table.find(&Method::GET, "/v1/namespaces/default/keys/a/b") {
            super::super::routes::Lookup::Found(r, _) => r.id,
            other => panic!("{other:?}"),
        };
        let resp = Response::new(super::super::full("{}"));
        let resp = m.record(resp, &Method::GET, RouteId::Table(get), Instant::now());
        let before = text(&registry);
        assert!(
            before.contains(r#"http_response_status_code="200"} 0"#),
            "not before the body ends: {before}"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "{}");
        let out = text(&registry);
        assert!(
            out.contains(r#"http_server_request_duration_seconds_count{http_request_method="GET",http_route="/v1/namespaces/{namespace}/keys/{key}",http_response_status_code="200"} 1"#),
            "{out}"
        );
        assert!(!out.contains("a/b") && !out.contains("default"), "{out}");
    }

    #[test]
    fn labels_stay_bounded() {
        let (m, registry, _) = recorder();
        let odd = Method::from_bytes(b"BREW").unwrap();
        let mut resp = Response::new(super::super::full(""));
        *resp.status_mut() = http::StatusCode::from_u16(418).unwrap();
        drop(m.record(resp, &odd, RouteId::Unmatched, Instant::now()));
        drop(m.record(
            Response::new(super::super::full("")),
            &Method::GET,
            RouteId::Metrics,
            Instant::now(),
        ));
        let out = text(&registry);
        assert!(
            out.contains(r#"http_server_request_duration_seconds_count{http_request_method="_OTHER",http_route="_unmatched",http_response_status_code="418"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"http_server_request_duration_seconds_count{http_request_method="GET",http_route="/metrics",http_response_status_code="200"} 1"#),
            "{out}"
        );
        assert!(!out.contains("BREW"), "{out}");
    }
}
