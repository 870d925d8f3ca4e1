//! The gRPC front door: one HTTP/2 (h2c) listener, and [`FrontDoor`], the
//! service behind it, which sends each call by its `:path` either to the
//! data plane (the data services, forwarded to patterns) or to the
//! proxy's own tonic services (health, admin, reflection). The HTTP
//! gateway calls the same `FrontDoor` in-process, so both doors run the
//! same code from here on.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpListener;
use tonic::Status;
use tonic::service::Routes;
use tracing::warn;

use crate::access::{Access, CertIdentity, Role};
use crate::dataplane::{CallBody, DataPlane};
use crate::error::ApiError;

/// The gRPC services of one listener family, behind one `Service`: the
/// data plane and health for the data doors, the admin API, reflection
/// and health for the admin door.
#[derive(Clone)]
pub struct FrontDoor {
    /// `None`: data calls are not served here (UNIMPLEMENTED).
    data: Option<Arc<DataPlane>>,
    services: Routes,
    /// The client of the connection this copy serves.
    peer: Option<std::net::SocketAddr>,
    /// The name in that connection's client certificate.
    cert: Option<CertIdentity>,
    /// Checked for admin calls (`trellis.admin.v1.Admin`); data calls are
    /// checked in the data plane (`Authorize`), whose namespace it knows.
    access: Access,
}

impl FrontDoor {
    /// `services` are the proxy's own; data calls go to `data`.
    pub fn new(data: DataPlane, services: Routes) -> Self {
        FrontDoor {
            access: data.access().clone(),
            data: Some(Arc::new(data)),
            services,
            peer: None,
            cert: None,
        }
    }

    /// Only the proxy's own `services`: a data call is UNIMPLEMENTED here.
    /// Admin calls are checked against `access`.
    pub fn without_data(services: Routes, access: Access) -> Self {
        FrontDoor {
            data: None,
            services,
            peer: None,
            cert: None,
            access,
        }
    }

    /// This front door for one client connection: its calls carry the
    /// client's address (`dataplane::Peer`) and the name in its client
    /// certificate (`access::CertIdentity`), if any.
    pub fn for_connection(&self, peer: std::net::SocketAddr, cert: Option<CertIdentity>) -> Self {
        FrontDoor {
            peer: Some(peer),
            cert,
            ..self.clone()
        }
    }

    /// With `access:`, an admin call must come from an identity with the
    /// `admin` role; `Err` is the refusal to send.
    fn check_admin<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        let Some(rules) = self.access.rules() else {
            return Ok(());
        };
        if !req.uri().path().starts_with(crate::access::ADMIN_PREFIX) {
            return Ok(());
        }
        let cert = req.extensions().get::<CertIdentity>();
        rules
            .check(req.headers(), cert, None, Role::Admin)
            .map(|_| ())
    }
}

/// A response body from either side of the front door.
// Not boxed: every data call's body would cost an allocation, and the
// body is moved once, into the connection's stream task.
#[allow(clippy::large_enum_variant)]
pub enum FrontBody {
    Data(CallBody),
    Own(tonic::body::Body),
}

impl Body for FrontBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            FrontBody::Data(b) => Pin::new(b).poll_frame(cx),
            FrontBody::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FrontBody::Data(b) => b.is_end_stream(),
            FrontBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FrontBody::Data(b) => b.size_hint(),
            FrontBody::Own(b) => b.size_hint(),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<FrontBody>, Infallible>> + Send>>;

impl<B> tower::Service<Request<B>> for FrontDoor
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError> + std::fmt::Display,
{
    type Response = Response<FrontBody>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> BoxFuture {
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(crate::dataplane::Peer(peer));
        }
        if let Some(cert) = &self.cert {
            req.extensions_mut().insert(cert.clone());
        }
        if let Err(e) = self.check_admin(&req) {
            let refusal = crate::dataplane::refusal(e).map(FrontBody::Data);
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        if let Some(data) = self
            .data
            .as_ref()
            .filter(|_| crate::dataplane::is_data_path(req.uri().path()))
        {
            let data = data.clone();
            Box::pin(async move { Ok(data.handle(req).await.map(FrontBody::Data)) })
        } else {
            let call = tower::Service::call(&mut self.services, req);
            Box::pin(async move {
                let response = call.await?;
                Ok(response.map(FrontBody::Own))
            })
        }
    }
}

/// Serves gRPC on `listener` until `closing` is cancelled, then sends
/// GOAWAY to every connection and lets calls in flight finish within
/// `grace`.
pub async fn serve(
    front: FrontDoor,
    listener: TcpListener,
    tls: Option<crate::tls::DoorTls>,
    closing: crate::shutdown::CancellationToken,
    grace: crate::shutdown::Grace,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .auto_date_header(false)
        // The message limit plus headroom, so a whole 4 MiB message can be
        // in flight on a stream without waiting on window updates.
        .initial_stream_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = closing.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                warn!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Without it a response waits on Nagle + delayed ACK (~40 ms).
        let _ = stream.set_nodelay(true);
        let (watcher, http2, tls, closing, front) = (
            graceful.watcher(),
            http2.clone(),
            tls.clone(),
            closing.clone(),
            front.clone(),
        );
        // The handshake in the connection's task: a slow client holds up
        // no other.
        tokio::spawn(async move {
            let Some(stream) = crate::tls::open(tls.as_ref(), stream, peer, &closing).await else {
                return;
            };
            let cert = crate::access::of_stream(&stream);
            let service = TowerToHyperService::new(front.for_connection(peer, cert));
            let conn = http2.serve_connection(TokioIo::new(stream), service);
            let _ = watcher.watch(conn).await;
        });
    }
    drop(listener);
    if !grace.bound(graceful.shutdown()).await {
        warn!(
            "gRPC calls still in flight after shutdown_grace (or a second signal); closing anyway"
        );
    }
}
