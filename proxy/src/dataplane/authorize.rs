//! `Authorize`: with `access:` configured, every data call names its
//! caller (bearer token, else client certificate) and must hold the
//! method's role — `read` for Get, List, Subscribe; `write` for Put,
//! Delete, Publish — on its namespace (`crate::access`). Before `Route`:
//! a caller without the role learns nothing about the namespace (whether
//! it exists, which pattern serves it). The caller's identity is kept on
//! the call (the per-caller rate limit keys on it), and its
//! `authorization` header is removed: a token is for the proxy, never
//! passed on to a pattern. A keyed write's fingerprint takes the identity
//! in (`idempotency::identity_fingerprint`): another caller reusing the
//! key is refused as a reuse, never handed the first caller's answer.
//!
//! Without `access:` the call passes untouched, as before access control.

use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures::future::Either;
use http::Response;
use tower::{Layer, Service};

use trellis_proto::idempotency as idem;

use super::Call;
use super::body::CallBody;
use crate::access::{Access, CertIdentity, Role};
use crate::error::ApiError;

pub struct AuthorizeLayer {
    access: Access,
}

impl AuthorizeLayer {
    pub fn new(access: Access) -> Self {
        AuthorizeLayer { access }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            access: self.access.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    access: Access,
}

/// The role a data method needs.
fn role_for(call: &Call) -> Role {
    if call.method.writes() {
        Role::Write
    } else {
        Role::Read
    }
}

impl<S> Service<Call> for Authorize<S>
where
    S: Service<Call, Response = Response<CallBody>, Error = ApiError>,
{
    type Response = Response<CallBody>;
    type Error = ApiError;
    type Future = Either<S::Future, Ready<Result<Response<CallBody>, ApiError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ApiError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let Some(rules) = self.access.rules() else {
            return Either::Left(self.inner.call(call));
        };
        let cert = call.cert.clone().map(CertIdentity);
        match rules.check(
            &call.headers,
            cert.as_ref(),
            Some(&call.namespace),
            role_for(&call),
        ) {
            Ok(identity) => {
                call.headers.remove(http::header::AUTHORIZATION);
                // A keyed write: the identity joins its fingerprint, so
                // an idempotency key is the caller's own.
                if call.headers.contains_key(idem::FINGERPRINT) {
                    let fp = idem::identity_fingerprint(
                        &identity,
                        call.path.path(),
                        &call.message[super::wire::PREFIX_LEN..],
                    );
                    if let Ok(mut v) = http::HeaderValue::from_str(&fp) {
                        v.set_sensitive(true);
                        call.headers.insert(idem::FINGERPRINT, v);
                    }
                }
                call.identity = Some(identity);
                Either::Left(self.inner.call(call))
            }
            Err(e) => Either::Right(ready(Err(e))),
        }
    }
}
