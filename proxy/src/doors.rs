//! The proxy's listeners — the gRPC door and the HTTP gateway's — and the
//! tasks that serve them. A reload that changes `listen.grpc` or
//! `listen.http` binds the new address first (a bind failure refuses the
//! reload, changing nothing), then serves it, then closes the old door
//! as a shutdown would: GOAWAY / `Connection: close`, calls in flight
//! finish within `shutdown_grace`.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::join_all;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{Listen, Problem};
use crate::front::{self, FrontDoor};
use crate::gateway::Gateway;
use crate::shutdown::{CancellationToken, Grace};

/// One listener and the task serving it.
struct Door {
    addr: SocketAddr,
    close: CancellationToken,
    task: JoinHandle<()>,
}

impl Door {
    fn close(self) -> JoinHandle<()> {
        self.close.cancel();
        self.task
    }
}

/// Every open door, and those closing after a re-bind.
pub struct Doors {
    front: FrontDoor,
    gateway: Arc<Gateway>,
    grace: Grace,
    grpc: Door,
    http: Option<Door>,
    closing: Vec<JoinHandle<()>>,
}

/// New listeners, bound and not yet served.
pub struct Bound {
    grpc: Option<TcpListener>,
    /// `Some(None)`: turn the HTTP door off.
    http: Option<Option<TcpListener>>,
}

impl Doors {
    /// Serves `grpc` (and `http`, when given) until [`Doors::close`].
    pub fn open(
        front: FrontDoor,
        gateway: Arc<Gateway>,
        grace: Grace,
        grpc: TcpListener,
        http: Option<TcpListener>,
    ) -> std::io::Result<Doors> {
        let grpc = serve_grpc(&front, &grace, grpc)?;
        let http = http.map(|l| serve_http(&gateway, &grace, l)).transpose()?;
        Ok(Doors {
            front,
            gateway,
            grace,
            grpc,
            http,
            closing: Vec::new(),
        })
    }

    /// The addresses served now.
    pub fn addrs(&self) -> (SocketAddr, Option<SocketAddr>) {
        (self.grpc.addr, self.http.as_ref().map(|d| d.addr))
    }

    /// Binds what changed between `old` and `new`; every address that
    /// cannot be bound is a problem naming its field.
    pub async fn bind(old: &Listen, new: &Listen) -> Result<Bound, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bound = Bound {
            grpc: None,
            http: None,
        };
        if old.grpc != new.grpc {
            match bind(new.grpc, "listen.grpc").await {
                Ok(l) => bound.grpc = Some(l),
                Err(p) => problems.push(p),
            }
        }
        if old.http != new.http {
            match new.http {
                None => bound.http = Some(None),
                Some(addr) => match bind(addr, "listen.http").await {
                    Ok(l) => bound.http = Some(Some(l)),
                    Err(p) => problems.push(p),
                },
            }
        }
        if problems.is_empty() {
            Ok(bound)
        } else {
            Err(problems)
        }
    }

    /// Serves the new listeners, then closes the doors they replace.
    pub fn rebind(&mut self, bound: Bound) -> std::io::Result<()> {
        let changed = bound.grpc.is_some() || bound.http.is_some();
        if let Some(listener) = bound.grpc {
            let door = serve_grpc(&self.front, &self.grace, listener)?;
            let old = std::mem::replace(&mut self.grpc, door);
            self.closing.push(old.close());
        }
        if let Some(http) = bound.http {
            let door = http
                .map(|l| serve_http(&self.gateway, &self.grace, l))
                .transpose()?;
            if let Some(old) = std::mem::replace(&mut self.http, door) {
                self.closing.push(old.close());
            }
        }
        self.closing.retain(|t| !t.is_finished());
        if changed {
            let (grpc, http) = self.addrs();
            info!(
                grpc = %grpc,
                http = %http.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
                reload = true,
                "listening"
            );
        }
        Ok(())
    }

    /// Closes every door (GOAWAY, calls in flight finish within the
    /// grace) and waits until all are closed.
    pub async fn close(self) {
        let mut tasks = self.closing;
        tasks.push(self.grpc.close());
        tasks.extend(self.http.map(Door::close));
        join_all(tasks).await;
    }
}

async fn bind(addr: SocketAddr, field: &str) -> Result<TcpListener, Problem> {
    TcpListener::bind(addr).await.map_err(|e| Problem {
        field: field.to_string(),
        message: format!(
            "cannot listen on {addr}: {e}; another process may hold it — choose a free address"
        ),
    })
}

fn serve_grpc(front: &FrontDoor, grace: &Grace, listener: TcpListener) -> std::io::Result<Door> {
    let addr = listener.local_addr()?;
    let close = CancellationToken::new();
    let task = tokio::spawn(front::serve(
        front.clone(),
        listener,
        close.clone(),
        grace.clone(),
    ));
    Ok(Door { addr, close, task })
}

fn serve_http(
    gateway: &Arc<Gateway>,
    grace: &Grace,
    listener: TcpListener,
) -> std::io::Result<Door> {
    let addr = listener.local_addr()?;
    let close = CancellationToken::new();
    let task = tokio::spawn(crate::gateway::serve(
        gateway.clone(),
        listener,
        close.clone(),
        grace.clone(),
    ));
    Ok(Door { addr, close, task })
}
