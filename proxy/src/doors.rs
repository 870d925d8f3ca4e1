//! The proxy's listeners — the gRPC door, the HTTP gateway's and the admin
//! door — and the tasks that serve them. A reload that changes a `listen`
//! address binds the new address first (a bind failure refuses the
//! reload, changing nothing), then serves it, then closes the old door as
//! a shutdown would: GOAWAY / `Connection: close`, calls in flight finish
//! within `shutdown_grace`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::join_all;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{Listen, Problem};
use crate::front::{self, FrontDoor};
use crate::gateway::Gateway;
use crate::gateway::mixed::AdminDoor;
use crate::shutdown::{CancellationToken, Grace};
use crate::tls::{Alpn, DoorTls, Tls};

/// A listener's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `listen.grpc`: the data API and health over gRPC.
    Grpc,
    /// `listen.http`: the data API over HTTP/JSON, probes, `/metrics`.
    Http,
    /// `listen.admin`: the admin API over gRPC and HTTP/JSON.
    Admin,
}

impl Surface {
    pub const ALL: [Surface; 3] = [Surface::Grpc, Surface::Http, Surface::Admin];

    /// Its field in the configuration, e.g. `listen.grpc`.
    pub fn field(self) -> &'static str {
        match self {
            Surface::Grpc => "listen.grpc",
            Surface::Http => "listen.http",
            Surface::Admin => "listen.admin",
        }
    }

    /// The address `listen` gives it (`None`: off).
    pub fn addr(self, listen: &Listen) -> Option<SocketAddr> {
        match self {
            Surface::Grpc => Some(listen.grpc),
            Surface::Http => listen.http,
            Surface::Admin => listen.admin,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What serves each surface.
pub struct Services {
    /// Data and health, for `listen.grpc`; the HTTP gateway calls it too.
    pub front: FrontDoor,
    /// The data routes, for `listen.http`.
    pub gateway: Arc<Gateway>,
    /// Admin, reflection and health over gRPC, the admin routes over HTTP.
    pub admin: Arc<AdminDoor>,
}

/// The addresses served now, by surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs([Option<SocketAddr>; 3]);

impl Addrs {
    pub fn get(&self, surface: Surface) -> Option<SocketAddr> {
        self.0[surface.index()]
    }
}

/// An address for a log line: the address, or `off`.
pub struct Shown(pub Option<SocketAddr>);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("off"),
        }
    }
}

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
    services: Services,
    /// TLS on every door, when configured.
    tls: Option<Arc<Tls>>,
    grace: Grace,
    /// By [`Surface::index`]; `None`: that door is off.
    open: [Option<Door>; 3],
    closing: Vec<JoinHandle<()>>,
}

/// New listeners, bound and not yet served: for each changed surface, its
/// listener, or `None` to turn it off.
pub struct Bound(Vec<(Surface, Option<TcpListener>)>);

impl Doors {
    /// Serves each listener given (by surface) until [`Doors::close`].
    pub fn open(
        services: Services,
        tls: Option<Arc<Tls>>,
        grace: Grace,
        listeners: Vec<(Surface, TcpListener)>,
    ) -> std::io::Result<Doors> {
        let mut doors = Doors {
            services,
            tls,
            grace,
            open: [None, None, None],
            closing: Vec::new(),
        };
        for (surface, listener) in listeners {
            doors.open[surface.index()] = Some(doors.serve(surface, listener)?);
        }
        Ok(doors)
    }

    /// Reads the TLS files again (a reload asks for it); new connections
    /// use what they hold.
    pub fn refresh_tls(&self) {
        if let Some(tls) = &self.tls {
            tls.refresh("reload");
        }
    }

    /// The addresses served now.
    pub fn addrs(&self) -> Addrs {
        Addrs(Surface::ALL.map(|s| self.open[s.index()].as_ref().map(|d| d.addr)))
    }

    /// Binds what changed between `old` and `new`; every address that
    /// cannot be bound is a problem naming its field.
    pub async fn bind(old: &Listen, new: &Listen) -> Result<Bound, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bound = Vec::new();
        for surface in Surface::ALL {
            let (before, after) = (surface.addr(old), surface.addr(new));
            if before == after {
                continue;
            }
            match after {
                None => bound.push((surface, None)),
                Some(addr) => match bind(addr, surface.field()).await {
                    Ok(l) => bound.push((surface, Some(l))),
                    Err(p) => problems.push(p),
                },
            }
        }
        if problems.is_empty() {
            Ok(Bound(bound))
        } else {
            Err(problems)
        }
    }

    /// Serves the new listeners, then closes the doors they replace.
    pub fn rebind(&mut self, bound: Bound) -> std::io::Result<()> {
        let changed = !bound.0.is_empty();
        for (surface, listener) in bound.0 {
            let door = listener.map(|l| self.serve(surface, l)).transpose()?;
            if let Some(old) = std::mem::replace(&mut self.open[surface.index()], door) {
                self.closing.push(old.close());
            }
        }
        self.closing.retain(|t| !t.is_finished());
        if changed {
            let addrs = self.addrs();
            info!(
                grpc = %Shown(addrs.get(Surface::Grpc)),
                http = %Shown(addrs.get(Surface::Http)),
                admin = %Shown(addrs.get(Surface::Admin)),
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
        tasks.extend(self.open.into_iter().flatten().map(Door::close));
        join_all(tasks).await;
    }

    fn serve(&self, surface: Surface, listener: TcpListener) -> std::io::Result<Door> {
        let addr = listener.local_addr()?;
        let close = CancellationToken::new();
        let (closing, grace) = (close.clone(), self.grace.clone());
        let tls = |alpn| {
            self.tls.as_ref().map(|tls| DoorTls {
                tls: tls.clone(),
                alpn,
            })
        };
        let task = match surface {
            Surface::Grpc => tokio::spawn(front::serve(
                self.services.front.clone(),
                listener,
                tls(Alpn::H2),
                closing,
                grace,
            )),
            Surface::Http => tokio::spawn(crate::gateway::serve(
                self.services.gateway.clone(),
                listener,
                tls(Alpn::H2AndHttp1),
                closing,
                grace,
            )),
            Surface::Admin => tokio::spawn(crate::gateway::serve(
                self.services.admin.clone(),
                listener,
                tls(Alpn::H2AndHttp1),
                closing,
                grace,
            )),
        };
        Ok(Door { addr, close, task })
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
