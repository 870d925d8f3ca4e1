//! `Route`: namespace → its pattern's processes (a [`Pool`]: the
//! replicas, or the one process). Reads each process's latest status (a
//! `watch` snapshot: no lock shared with the supervisor, no await) and
//! refuses what no process can take; `Balance`, below, picks the replica.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::future::{Either, Ready, ready};
use http::Response;
use tower::{Layer, Service};

use super::balance::Pool;
use super::body::CallBody;
use super::{Call, errors};
use crate::config::{Config, OutlierDetection};
use crate::error::ApiError;
use crate::supervisor::PatternHandle;

/// Namespace → pool. A blue/green replacement or a reload swaps the whole
/// map in one store (`arc-swap`): a call sees the old map or the new one,
/// never a mix, and reading it takes no lock.
#[derive(Clone)]
pub struct Router {
    routes: Arc<ArcSwap<Routes>>,
}

#[derive(Default)]
struct Routes {
    pools: HashMap<String, Arc<Pool>>,
    /// Each pattern's outlier detection (absent: the defaults).
    outlier: HashMap<String, OutlierDetection>,
}

impl Routes {
    fn new(patterns: &[PatternHandle], outlier: HashMap<String, OutlierDetection>) -> Self {
        // Every process of a pattern serves the same namespaces.
        let mut members: HashMap<&str, Vec<PatternHandle>> = HashMap::new();
        for p in patterns {
            members.entry(p.pattern()).or_default().push(p.clone());
        }
        let mut pools = HashMap::new();
        for (pattern, mut members) in members {
            members.sort_by_key(|m| m.replica());
            let namespaces = members[0].namespaces().to_vec();
            let pool = Arc::new(Pool::new(
                pattern,
                members,
                outlier.get(pattern).cloned().unwrap_or_default(),
            ));
            for ns in namespaces {
                pools.insert(ns, pool.clone());
            }
        }
        Routes { pools, outlier }
    }
}

/// Each pattern's outlier detection settings in `config`.
pub fn outlier_settings(config: &Config) -> HashMap<String, OutlierDetection> {
    config
        .patterns
        .iter()
        .map(|p| (p.name.clone(), p.outlier_detection.clone()))
        .collect()
}

impl Router {
    pub fn new(patterns: &[PatternHandle]) -> Self {
        Self::configured(patterns, HashMap::new())
    }

    /// Routes to `patterns` with each pattern's `outlier` settings.
    pub fn configured(
        patterns: &[PatternHandle],
        outlier: HashMap<String, OutlierDetection>,
    ) -> Self {
        Router {
            routes: Arc::new(ArcSwap::from_pointee(Routes::new(patterns, outlier))),
        }
    }

    /// Routes every namespace to the processes in `patterns` that serve
    /// it, from the next call on (the outlier settings stay).
    pub fn update(&self, patterns: &[PatternHandle]) {
        let outlier = self.routes.load().outlier.clone();
        self.routes.store(Arc::new(Routes::new(patterns, outlier)));
    }

    /// As `update`, with new outlier settings.
    pub fn reconfigure(
        &self,
        patterns: &[PatternHandle],
        outlier: HashMap<String, OutlierDetection>,
    ) {
        self.routes.store(Arc::new(Routes::new(patterns, outlier)));
    }

    /// The processes serving `namespace` now, whatever their state.
    pub fn pool(&self, namespace: &str) -> Option<Arc<Pool>> {
        self.routes.load().pools.get(namespace).cloned()
    }

    /// The processes serving `namespace`, if one of them can take a call
    /// to `service` now.
    pub fn route(&self, namespace: &str, service: &str) -> Result<Arc<Pool>, ApiError> {
        if namespace.is_empty() {
            return Err(errors::empty_namespace());
        }
        let routes = self.routes.load();
        let Some(pool) = routes.pools.get(namespace) else {
            let mut known: Vec<&str> = routes.pools.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(errors::unknown_namespace(namespace, &known));
        };
        pool.check(namespace, service)?;
        Ok(pool.clone())
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
            Ok(pool) => {
                call.pool = Some(pool);
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
