//! `Route`: namespace → the serving pattern's data connection. Reads the
//! pattern's latest status (a `watch` snapshot: no lock shared with the
//! supervisor, no await) and refuses what cannot be forwarded.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::{Either, Ready, ready};
use http::Response;
use tower::{Layer, Service};

use super::body::CallBody;
use super::{Call, errors};
use crate::error::ApiError;
use crate::supervisor::{PatternHandle, State};
use crate::upstream::Upstream;

/// Namespace → pattern. A blue/green replacement swaps the whole map in
/// one store (`arc-swap`): a call sees the old map or the new one, never a
/// mix, and reading it takes no lock.
#[derive(Clone)]
pub struct Router {
    routes: Arc<ArcSwap<HashMap<String, PatternHandle>>>,
}

impl Router {
    pub fn new(patterns: &[PatternHandle]) -> Self {
        Router {
            routes: Arc::new(ArcSwap::from_pointee(Self::map(patterns))),
        }
    }

    fn map(patterns: &[PatternHandle]) -> HashMap<String, PatternHandle> {
        patterns
            .iter()
            .flat_map(|p| p.namespaces().iter().map(move |ns| (ns.clone(), p.clone())))
            .collect()
    }

    /// Routes every namespace to the pattern in `patterns` that serves it,
    /// from the next call on.
    pub fn update(&self, patterns: &[PatternHandle]) {
        self.routes.store(Arc::new(Self::map(patterns)));
    }

    /// The connection to the pattern serving `namespace` for `service`, if
    /// it is routable now.
    pub fn route(&self, namespace: &str, service: &str) -> Result<Upstream, ApiError> {
        if namespace.is_empty() {
            return Err(errors::empty_namespace());
        }
        let routes = self.routes.load();
        let Some(handle) = routes.get(namespace) else {
            let mut known: Vec<&str> = routes.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(errors::unknown_namespace(namespace, &known));
        };
        handle.with_status(|status| match (status.state, &status.upstream) {
            (State::Serving, Some(upstream)) if upstream.implements(service) => {
                Ok(upstream.clone())
            }
            (State::Serving, Some(upstream)) => {
                Err(errors::not_implemented(namespace, service, upstream))
            }
            (state, _) => Err(errors::not_serving(
                namespace,
                handle.name(),
                state,
                status.last_error.as_deref(),
            )),
        })
    }
}

pub struct RouteLayer {
    router: Router,
}

impl RouteLayer {
    pub fn new(router: Router) -> Self {
        RouteLayer { router }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route {
            inner,
            router: self.router.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Route<S> {
    inner: S,
    router: Router,
}

impl<S> Service<Call> for Route<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<Ready<Result<Response<CallBody>, ApiError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        match self.router.route(&call.namespace, call.method.service) {
            Ok(upstream) => {
                call.upstream = Some(upstream);
                Either::Right(self.inner.call(call))
            }
            Err(e) => Either::Left(ready(Err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_empty_namespaces_are_refused() {
        let router = Router::new(&[]);
        let err = router
            .route("nope", trellis_proto::KEY_VALUE_SERVICE)
            .unwrap_err();
        assert_eq!(err.code, tonic::Code::NotFound);
        assert!(err.message.contains("\"nope\""), "{}", err.message);
        assert!(
            err.message.contains("known namespaces: none"),
            "{}",
            err.message
        );
        let empty = router
            .route("", trellis_proto::KEY_VALUE_SERVICE)
            .unwrap_err();
        assert_eq!(empty.code, tonic::Code::InvalidArgument);
    }
}
