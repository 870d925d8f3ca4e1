//! PostgreSQL and pool errors → what the caller should do. Details (SQL
//! state, server message, address) are logged here; the caller gets a
//! message without internals.

use deadpool_postgres::{PoolError, Status, TimeoutType};
use pattern_sdk::Error;

/// A failed query or connection.
pub fn convert(e: &tokio_postgres::Error, what: &str) -> Error {
    let code = e.code().map(|c| c.code());
    match code {
        // connection_exception (08…), admin/crash shutdown, cannot connect
        // now (starting up or shutting down), read-only standby, and
        // serialization failures / deadlocks: all worth retrying.
        Some(c)
            if c.starts_with("08")
                || matches!(c, "57P01" | "57P02" | "57P03" | "25006" | "40001" | "40P01") =>
        {
            tracing::warn!(error = %e, sqlstate = c, op = what, "PostgreSQL unavailable");
            unavailable()
        }
        Some("57014") => {
            tracing::warn!(error = %e, op = what, "statement timed out");
            Error::unavailable(
                "the backend (PostgreSQL) did not finish the operation within \
                 statement_timeout; retry later, or raise `statement_timeout` in this \
                 pattern's config",
            )
        }
        Some("53300") => {
            tracing::warn!(error = %e, op = what, "too many connections");
            Error::resource_exhausted(
                "the backend (PostgreSQL) refused a connection: it has too many; lower \
                 `pool.max_size` in this pattern's config or raise the server's max_connections",
            )
        }
        Some(c) if c.starts_with("53") => {
            tracing::warn!(error = %e, sqlstate = c, op = what, "insufficient resources");
            Error::resource_exhausted(
                "the backend (PostgreSQL) is out of a resource (disk, memory); free some \
                 and retry",
            )
        }
        // No SQL state: the connection broke, was refused, or timed out.
        None => {
            tracing::warn!(error = %e, op = what, "PostgreSQL unreachable");
            unavailable()
        }
        Some(_) if e.is_closed() => {
            tracing::warn!(error = %e, op = what, "connection closed");
            unavailable()
        }
        Some(_) => Error::internal(format!("PostgreSQL {what} failed: {e:?}")),
    }
}

fn unavailable() -> Error {
    Error::unavailable(
        "the backend (PostgreSQL) is unavailable; retry later (the pattern reconnects by itself)",
    )
}

/// A failed connection checkout. A pool with no free connection within
/// `acquire_timeout` is `RESOURCE_EXHAUSTED`, saying how full it is and
/// what to change; failing to connect is `UNAVAILABLE`.
pub fn pool(e: &PoolError, status: Status, acquire_timeout: std::time::Duration) -> Error {
    match e {
        PoolError::Timeout(TimeoutType::Wait) => {
            tracing::warn!(
                max_size = status.max_size,
                in_use = status.size - status.available.min(status.size),
                waiting = status.waiting,
                "connection pool exhausted"
            );
            Error::resource_exhausted(format!(
                "the PostgreSQL connection pool is exhausted: all {} connections are in use \
                 and {} requests are waiting; none became free within {:?}. Raise \
                 `pool.max_size` (keeping it under the server's max_connections) or \
                 `pool.acquire_timeout` in this pattern's config, or send fewer concurrent \
                 requests",
                status.max_size, status.waiting, acquire_timeout
            ))
        }
        PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
            tracing::warn!(error = %e, "connecting to PostgreSQL timed out");
            unavailable()
        }
        PoolError::Backend(e) => convert(e, "connect"),
        PoolError::Closed => Error::unavailable("the pattern is shutting down; retry shortly"),
        other => Error::internal(format!("connection pool: {other}")),
    }
}
