//! The data connection to one pattern process: one HTTP/2 connection, made
//! by the supervisor when the process starts serving and dropped with its
//! status when the process goes. The data plane opens one stream on it per
//! call and passes the call's bytes through unchanged.
//!
//! Built on `h2` directly rather than on hyper's client connection:
//! hyper's `SendRequest` hands every request to the connection's task
//! through a channel and spawns a task per response, two task hops per call
//! on the path this proxy exists to keep short. With `h2`, the calling task
//! opens the stream and polls the response itself; the connection task
//! only moves bytes.
//!
//! A connection that breaks while the process lives (the pattern closed it)
//! is replaced on the next call; calls never share a half-dead connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use tracing::{Instrument, debug};

use crate::supervisor::handshake::Endpoint;
use crate::supervisor::secret::Secret;

/// How long connecting to a pattern may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Flow-control windows large enough that a 4 MiB message crosses the hop
/// without waiting for window updates on every 64 KiB (h2's default).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// Why a call could not be sent to a pattern. Every case means the call
/// did not reach the pattern, so it is safe to retry.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error(
        "connecting to {endpoint} took longer than {}",
        humantime::format_duration(CONNECT_TIMEOUT)
    )]
    ConnectTimeout { endpoint: Endpoint },
    #[error("the HTTP/2 connection to {endpoint} failed: {source}")]
    Protocol {
        endpoint: Endpoint,
        source: h2::Error,
    },
}

/// A cheap, cloneable handle on one pattern process's data connection.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    pattern: Arc<str>,
    endpoint: Endpoint,
    /// The data services the process said it implements.
    interfaces: Arc<[String]>,
    authority: http::uri::Authority,
    /// The process's secret, added to every call (sensitive: never
    /// indexed by HPACK, never printed).
    secret: http::HeaderValue,
    /// The current connection. Held only to clone or replace the handle,
    /// never across an await.
    conn: Mutex<Option<SendRequest<Bytes>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("pattern", &self.inner.pattern)
            .field("endpoint", &self.inner.endpoint)
            .finish()
    }
}

impl Upstream {
    /// Connects to a process that has just started serving.
    pub async fn connect(
        pattern: &str,
        endpoint: Endpoint,
        interfaces: &[String],
        secret: &Secret,
    ) -> Result<Upstream, UpstreamError> {
        let authority = match &endpoint {
            Endpoint::Tcp(addr) => addr.to_string().parse().ok(),
            Endpoint::Unix(_) => None,
        }
        .unwrap_or_else(|| http::uri::Authority::from_static("pattern.invalid"));
        let upstream = Upstream {
            inner: Arc::new(Inner {
                pattern: pattern.into(),
                endpoint,
                interfaces: interfaces.into(),
                authority,
                secret: secret.header(),
                conn: Mutex::new(None),
            }),
        };
        let send = upstream.open().await?;
        upstream.install(send);
        Ok(upstream)
    }

    pub fn pattern(&self) -> &str {
        &self.inner.pattern
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    pub fn interfaces(&self) -> &[String] {
        &self.inner.interfaces
    }

    pub fn implements(&self, service: &str) -> bool {
        self.inner.interfaces.iter().any(|i| i == service)
    }

    /// The URI of `path` on this pattern.
    pub fn uri(&self, path: http::uri::PathAndQuery) -> http::Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.inner.authority.clone());
        parts.path_and_query = Some(path);
        http::Uri::from_parts(parts).unwrap_or_default()
    }

    /// Opens a stream with `head` (plus the process's secret, which
    /// replaces any value a caller sent) and sends `body` as the whole
    /// request body. When the connection turns out to be closed before the
    /// stream opened, it is replaced once and the call goes on the new one.
    pub async fn send(
        &self,
        mut head: http::Request<()>,
        body: Bytes,
    ) -> Result<ResponseFuture, UpstreamError> {
        head.headers_mut().insert(
            http::HeaderName::from_static(trellis_proto::protocol::SECRET_HEADER),
            self.inner.secret.clone(),
        );
        let mut fresh = false;
        loop {
            let current = self.current();
            let send = match current {
                Some(s) => s,
                None => {
                    fresh = true;
                    let s = self.open().await?;
                    self.install(s.clone());
                    s
                }
            };
            match send.ready().await {
                Ok(mut send) => {
                    let (response, mut stream) = send
                        .send_request(head, false)
                        .map_err(|e| self.protocol(e))?;
                    // Buffered by h2 beyond the peer's window and flushed as
                    // it opens; bounded by the message limit.
                    stream.send_data(body, true).map_err(|e| self.protocol(e))?;
                    return Ok(response);
                }
                Err(e) if !fresh => {
                    debug!(pattern = %self.inner.pattern, error = %e, "data connection closed; reconnecting");
                    self.reset_connection();
                    continue;
                }
                Err(e) => return Err(self.protocol(e)),
            }
        }
    }

    fn protocol(&self, source: h2::Error) -> UpstreamError {
        UpstreamError::Protocol {
            endpoint: self.inner.endpoint.clone(),
            source,
        }
    }

    fn current(&self) -> Option<SendRequest<Bytes>> {
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn install(&self, send: SendRequest<Bytes>) {
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(send);
    }

    /// Drops the current connection (it failed); the next call makes a new one.
    pub fn reset_connection(&self) {
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A new connection, its driving task spawned.
    async fn open(&self) -> Result<SendRequest<Bytes>, UpstreamError> {
        let endpoint = &self.inner.endpoint;
        let connect = async {
            let mut builder = h2::client::Builder::new();
            builder
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .enable_push(false);
            let protocol = |source| UpstreamError::Protocol {
                endpoint: endpoint.clone(),
                source,
            };
            let io_error = |source| UpstreamError::Connect {
                endpoint: endpoint.clone(),
                source,
            };
            let span = tracing::debug_span!("data connection", pattern = %self.inner.pattern);
            match endpoint {
                Endpoint::Tcp(addr) => {
                    let io = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(io_error)?;
                    let _ = io.set_nodelay(true);
                    let (send, conn) = builder.handshake(io).await.map_err(protocol)?;
                    tokio::spawn(drive(conn).instrument(span));
                    Ok(send)
                }
                Endpoint::Unix(path) => {
                    let io = tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(io_error)?;
                    let (send, conn) = builder.handshake(io).await.map_err(protocol)?;
                    tokio::spawn(drive(conn).instrument(span));
                    Ok(send)
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                endpoint: endpoint.clone(),
            })?
    }
}

/// Runs one connection until it closes: when the pattern goes away, or
/// when every handle on it has been dropped and its streams are done.
async fn drive<T>(conn: h2::client::Connection<T, Bytes>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = conn.await {
        debug!(error = %e, "data connection ended");
    }
}
