//! The admin door: the admin API over gRPC *and* HTTP/JSON on one
//! listener (`listen.admin`), so an operator has one admin address, as
//! Envoy's and Linkerd's admin ports are one. A request whose
//! `Content-Type` is `application/grpc…` goes to the admin front door
//! (Admin, reflection, health); any other to the admin gateway (the
//! `Admin` routes, `/openapi.json` for them, `/metrics`, `/livez`,
//! `/readyz`).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tonic::Status;

use super::{Gateway, Handler};
use crate::config::HttpLimits;
use crate::front::FrontDoor;

pub struct AdminDoor {
    grpc: FrontDoor,
    http: Arc<Gateway>,
}

impl AdminDoor {
    /// `grpc` serves gRPC requests, `http` every other.
    pub fn new(grpc: FrontDoor, http: Arc<Gateway>) -> Self {
        AdminDoor { grpc, http }
    }
}

/// Is this a gRPC request (`application/grpc`, `application/grpc+proto`, …)?
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

impl Handler for AdminDoor {
    type Body = UnsyncBoxBody<Bytes, Status>;

    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Self::Body> {
        if is_grpc(&req) {
            let mut grpc = self.grpc.clone();
            match tower::Service::call(&mut grpc, req).await {
                Ok(resp) => resp.map(|b| b.boxed_unsync()),
                Err(never) => match never {},
            }
        } else {
            self.http
                .handle(req)
                .await
                .map(|b| b.map_err(|never| match never {}).boxed_unsync())
        }
    }

    fn limits(&self) -> &HttpLimits {
        self.http.limits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_told_by_its_content_type() {
        let req = |ct: &str| {
            Request::builder()
                .header("content-type", ct)
                .body(())
                .unwrap()
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc; x=1",
        ] {
            assert!(is_grpc(&req(ct)), "{ct}");
        }
        for ct in ["application/json", "application/grpc-web", "text/plain"] {
            assert!(!is_grpc(&req(ct)), "{ct}");
        }
        assert!(!is_grpc(&Request::new(())));
    }
}
