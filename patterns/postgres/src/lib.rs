//! trellis-postgres: a durable key-value pattern on PostgreSQL, written
//! only against `pattern-sdk`, `tokio-postgres` and `deadpool-postgres`.
//!
//! - Every write is one statement in its own transaction (autocommit), so
//!   an acknowledged Put is committed (durable with the server's default
//!   `synchronous_commit = on`).
//! - A write with an idempotency key is one transaction that claims the
//!   key in `<table>_idempotency`, writes with the same SQL, and records
//!   the answer (`records.rs`): the record commits with the write or not
//!   at all, and a duplicate waits for the first to commit, then replays.
//! - Put is an upsert (`INSERT … ON CONFLICT DO UPDATE`); TTL is a column,
//!   `expires_at`, checked by every read and purged by a background task.
//! - List is keyset pagination on the primary key (`namespace`, `key`
//!   COLLATE "C"), so pages are in byte order with no duplicates or gaps
//!   while keys are added.
//! - A bounded connection pool: when every connection is busy for longer
//!   than `pool.acquire_timeout`, the caller gets `RESOURCE_EXHAUSTED`
//!   saying so, not a hang.
//! - Health is `SELECT 1` through the pool: `NOT_SERVING` while the database
//!   is unreachable; the pool reconnects by itself once it is back.
//! - Every query runs through the SDK's
//!   [`Backend`](pattern_sdk::observe::Backend) (`GET`, `PUT`, `DELETE`,
//!   `LIST`, the keyed `PUT_ONCE` and `DELETE_ONCE` (their whole
//!   transaction), and the background `PURGE`): a latency histogram by outcome and
//!   a span each, timed once a connection is in hand. The pool's figures
//!   (`Pool::status()`), its waits and its timeouts are exported too.
//!
//! - TLS (`tls:`): with `mode: verify-full` (the default once the block is
//!   there) every connection is TLS, and the server's certificate must
//!   chain to `tls.ca_file` (or the system's roots) and name the host
//!   (rustls through tokio-postgres-rustls). A failed handshake leaves the
//!   pattern `NOT_SERVING` with a message naming `config.tls.ca_file`.
//! - The password: `password_file` or `password_env` (backend-config), or
//!   `password` / the url's (kept for compatibility), else `PGPASSWORD`.
//!   Logs show `host:port/dbname` only.
//!
//! `schema.rs` has the table and its migrations, `errors.rs` the mapping of
//! failures to what the caller should do. See README.md.

mod errors;
mod keys;
mod records;
mod schema;
mod writes;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use backend_config::{Tls, read_secret};
use bytes::Bytes;
use deadpool_postgres::{
    Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts, tokio_postgres,
};
use pattern_sdk::idempotency::{Once, Outcome};
use pattern_sdk::observe::{Backend, PoolStatus};
use pattern_sdk::{
    Error, FieldViolation, Health, InitContext, KeyValue, ListPage, ListQuery, Pattern,
};
use serde::Deserialize;
use tokio::task::AbortHandle;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::Instrument;

pub use schema::{MAX_TABLE_NAME, Queries, migrations, validate_table};

/// libpq's variable for the password, read when the config gives none.
pub const PASSWORD_ENV: &str = "PGPASSWORD";
/// How long a health check may take; below the SDK's 1 s bound on the hook.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(800);
/// The `config:` block of a postgres entry in the proxy configuration.
/// Give either `url` or the separate connection fields, not both.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `postgres://user:password@host:port/dbname` or
    /// `host=… port=… user=… dbname=…`.
    pub url: Option<String>,
    /// Default 127.0.0.1.
    pub host: Option<String>,
    /// Default 5432.
    pub port: Option<u16>,
    /// Default `postgres`.
    pub user: Option<String>,
    /// Prefer `password_file` or `password_env`: a password written here
    /// sits in the config file.
    pub password: Option<String>,
    /// A file holding the password (one trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Default `postgres`.
    pub dbname: Option<String>,
    /// TLS to the server; without it, plain TCP (a url's
    /// `sslmode=require` is refused: it would not verify the server).
    pub tls: Option<PgTls>,
    /// The table holding the data; created on start if missing.
    pub table: String,
    pub pool: PoolConfig,
    /// How long opening one connection may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The server-side bound on each statement (`statement_timeout`).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// How often expired rows are deleted. (Expired keys are invisible at
    /// once either way.)
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
}

/// The `tls:` block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PgTls {
    pub mode: TlsMode,
    /// PEM file with the CA certificate(s) that signed the server's
    /// certificate; without it, the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that asks for one (`cert`
    /// authentication or `clientcert=verify-full` in pg_hba.conf).
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub key_file: Option<PathBuf>,
}

/// libpq's `sslmode`, the two values Trellis offers: TLS with full
/// verification, or none. (`require` and `verify-ca` accept a server that
/// is not the one named in the url, so they are not offered.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Always TLS; the certificate chains to the CA and names the host.
    #[default]
    VerifyFull,
    /// Plain TCP (the block's files are ignored).
    Disable,
}

impl PgTls {
    fn files(&self) -> Tls {
        Tls {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// The most connections open at once.
    pub max_size: usize,
    /// How long a request waits for a free connection before it fails with
    /// `RESOURCE_EXHAUSTED`.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: None,
            host: None,
            port: None,
            user: None,
            password: None,
            password_file: None,
            password_env: None,
            dbname: None,
            tls: None,
            table: "trellis_kv".into(),
            pool: PoolConfig::default(),
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            purge_interval: Duration::from_secs(10),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_size: 16,
            acquire_timeout: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// The connection settings, or every problem with the config.
    /// `lookup` reads the environment (passed in, so tests never touch the
    /// process's): for `password_env`, and libpq's `PGPASSWORD`, used only
    /// when no other setting gives a password.
    fn pg_config(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<tokio_postgres::Config, Vec<FieldViolation>> {
        let mut problems = Vec::new();
        let secret = read_secret(
            ("config.password_file", self.password_file.as_deref()),
            ("config.password_env", self.password_env.as_deref()),
            lookup,
        )
        .map_err(|v| problems.push(v))
        .ok()
        .flatten();
        let separate = self.host.is_some()
            || self.port.is_some()
            || self.user.is_some()
            || self.password.is_some()
            || self.dbname.is_some();
        let mut pg = match &self.url {
            Some(url) => {
                if separate {
                    problems.push(FieldViolation::new(
                        "config.url",
                        "give either url or host/port/user/password/dbname, not both",
                    ));
                }
                match url.parse::<tokio_postgres::Config>() {
                    Ok(pg) => pg,
                    Err(e) => {
                        problems.push(FieldViolation::new(
                            "config.url",
                            format!(
                                "is not a PostgreSQL connection string ({e}); write e.g. \
                                 postgres://user:password@127.0.0.1:5432/dbname"
                            ),
                        ));
                        tokio_postgres::Config::new()
                    }
                }
            }
            None => {
                let mut pg = tokio_postgres::Config::new();
                pg.host(self.host.as_deref().unwrap_or("127.0.0.1"))
                    .port(self.port.unwrap_or(5432))
                    .user(self.user.as_deref().unwrap_or("postgres"))
                    .dbname(self.dbname.as_deref().unwrap_or("postgres"));
                if let Some(password) = &self.password {
                    pg.password(password.as_bytes());
                }
                pg
            }
        };
        if pg.get_hosts().is_empty() {
            pg.host("127.0.0.1");
        }
        if pg.get_user().is_none() {
            pg.user("postgres");
        }
        if let Some(secret) = secret {
            if pg.get_password().is_some() {
                let field = if self.password_file.is_some() {
                    "config.password_file"
                } else {
                    "config.password_env"
                };
                problems.push(FieldViolation::new(
                    field,
                    "config.password (or the url) gives a password too; give only one",
                ));
            }
            pg.password(secret.expose().as_bytes());
        }
        if pg.get_password().is_none()
            && let Some(password) = lookup(PASSWORD_ENV).filter(|p| !p.is_empty())
        {
            pg.password(password.as_bytes());
        }
        match &self.tls {
            Some(tls) if tls.mode == TlsMode::VerifyFull => {
                pg.ssl_mode(SslMode::Require);
            }
            Some(_) => {
                pg.ssl_mode(SslMode::Disable);
            }
            None if pg.get_ssl_mode() == SslMode::Require => problems.push(FieldViolation::new(
                "config.url",
                "sslmode=require needs a tls: block (tls.ca_file: the CA that signed the \
                 server's certificate); trellis-postgres verifies the server's certificate \
                 and host, as libpq's verify-full",
            )),
            None => {}
        }
        if let Err(v) = schema::validate_table(&self.table) {
            problems.push(v);
        }
        if self.pool.max_size == 0 {
            problems.push(FieldViolation::new(
                "config.pool.max_size",
                "must be at least 1",
            ));
        }
        for (field, value) in [
            ("config.pool.acquire_timeout", self.pool.acquire_timeout),
            ("config.connect_timeout", self.connect_timeout),
            ("config.statement_timeout", self.statement_timeout),
            ("config.purge_interval", self.purge_interval),
        ] {
            if value.is_zero() {
                problems.push(FieldViolation::new(
                    field,
                    "must be longer than zero, e.g. \"1s\"",
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        pg.connect_timeout(self.connect_timeout)
            .application_name("trellis-postgres")
            .options(format!(
                "-c statement_timeout={}",
                self.statement_timeout.as_millis().max(1)
            ));
        Ok(pg)
    }
}

impl Config {
    /// The rustls configuration for `tls:` with `mode: verify-full`, or
    /// `None` for plain TCP; every problem with the block's files.
    fn tls_config(&self) -> Result<Option<rustls::ClientConfig>, Vec<FieldViolation>> {
        let Some(tls) = self.tls.as_ref().filter(|t| t.mode == TlsMode::VerifyFull) else {
            return Ok(None);
        };
        let files = tls.files().load("config.tls")?;
        files
            .client_config("config.tls")
            .map(Some)
            .map_err(|v| vec![v])
    }

    /// What to check when a handshake fails, when TLS is on.
    fn tls_hint(&self) -> Option<String> {
        let tls = self
            .tls
            .as_ref()
            .filter(|t| t.mode == TlsMode::VerifyFull)?;
        let field = if self.url.is_some() {
            "config.url"
        } else {
            "config.host"
        };
        Some(backend_config::tls_hint(
            "config.tls",
            Some(&tls.files()),
            field,
        ))
    }
}

/// `why`, followed by `hint` when `why` is about TLS.
fn with_hint(why: String, hint: Option<&str>) -> String {
    match hint {
        Some(hint) if backend_config::looks_like_tls(&why) => format!("{why}; {hint}"),
        _ => why,
    }
}

pub struct Postgres {
    pool: Pool,
    queries: Queries,
    acquire_timeout: Duration,
    /// Bound on one whole operation: waiting for a connection, connecting,
    /// and the statement.
    op_timeout: Duration,
    purger: AbortHandle,
    /// Retries creating the table when PostgreSQL was down at start.
    migrator: Option<AbortHandle>,
    schema: Arc<SchemaState>,
    /// `host:port/dbname` (never the password), for logs.
    target: String,
    /// With TLS: what to check when the handshake fails.
    tls_hint: Option<String>,
    /// Times and traces every query.
    backend: Backend,
    /// Counts waits for a connection and their timeouts.
    pool_metrics: pattern_sdk::observe::Pool,
}

impl Pattern for Postgres {
    type Config = Config;
    const NAME: &'static str = "postgres";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    async fn init(config: Config, ctx: InitContext) -> Result<Self, Error> {
        let lookup = |name: &str| std::env::var(name).ok();
        let (pg, tls) = match (config.pg_config(&lookup), config.tls_config()) {
            (Ok(pg), Ok(tls)) => (pg, tls),
            (pg, tls) => {
                let mut problems = pg.err().unwrap_or_default();
                problems.extend(tls.err().unwrap_or_default());
                return Err(Error::InvalidArgument(problems));
            }
        };
        let target = describe(&pg);
        let tls_hint = config.tls_hint();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => Manager::from_config(pg, MakeRustlsConnect::new(tls), manager_config),
            None => Manager::from_config(pg, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool.max_size)
            .wait_timeout(Some(config.pool.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::internal(format!("cannot build the connection pool: {e}")))?;

        // Create or migrate the table now. A server that refuses for good
        // (wrong password, no such database, a newer schema) fails the
        // start; one that is merely down does not: the pattern starts
        // NOT_SERVING (the proxy keeps it, not routable) and a task keeps
        // trying until the table is ready.
        let setup = Setup {
            pool: pool.clone(),
            table: config.table.clone(),
            target: target.clone(),
            tls_hint: tls_hint.clone(),
            limit: config.connect_timeout + config.statement_timeout + config.pool.acquire_timeout,
        };
        let schema = Arc::new(SchemaState::default());
        let migrator = match setup.attempt().await {
            Ok(found) => {
                schema.ready.store(true, Ordering::Release);
                tracing::info!(
                    pattern = ctx.name(),
                    target = %target,
                    table = %config.table,
                    from_version = found,
                    version = schema::migrations(&config.table).len(),
                    pool_max_size = config.pool.max_size,
                    "connected to PostgreSQL; table ready"
                );
                None
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(why)) => {
                tracing::warn!(
                    pattern = ctx.name(),
                    target = %target,
                    "{why}; starting anyway, NOT_SERVING until PostgreSQL answers (is it \
                     running? are config.url/host/port and config.tls right?)"
                );
                schema.set_problem(why);
                Some(tokio::spawn(setup.retry(Arc::clone(&schema))).abort_handle())
            }
        };

        let backend = ctx.backend("postgresql");
        let pool_metrics = ctx.pool({
            let pool = pool.clone();
            move || pool_status(pool.status())
        });
        let queries = Queries::new(&config.table);
        let purger = tokio::spawn(purge(
            pool.clone(),
            [queries.purge.clone(), queries.purge_records.clone()],
            config.purge_interval,
            Arc::clone(&schema),
            backend.clone(),
        ));
        Ok(Self {
            pool,
            queries,
            acquire_timeout: config.pool.acquire_timeout,
            op_timeout: config.pool.acquire_timeout
                + config.connect_timeout
                + config.statement_timeout
                + Duration::from_secs(1),
            purger: purger.abort_handle(),
            migrator,
            schema,
            target,
            tls_hint,
            backend,
            pool_metrics,
        })
    }

    async fn health(&self) -> Health {
        if !self.schema.is_ready() {
            return Health::NotServing(format!(
                "the table is not ready yet: {}",
                self.schema.problem()
            ));
        }
        let limit = HEALTH_TIMEOUT;
        let timeouts = Timeouts {
            wait: Some(limit.min(self.acquire_timeout)),
            create: Some(limit),
            recycle: Some(limit),
        };
        let check = async {
            let client = match self.pool.timeout_get(&timeouts).await {
                Ok(client) => client,
                // Every connection is checked out and busy: the database
                // answered them, so this is load, not an outage. Requests
                // that cannot get one are told RESOURCE_EXHAUSTED.
                Err(deadpool_postgres::PoolError::Timeout(
                    deadpool_postgres::TimeoutType::Wait,
                )) => {
                    tracing::debug!(status = ?self.pool.status(), "health: pool busy");
                    return Health::Serving;
                }
                Err(e) => {
                    return Health::NotServing(with_hint(
                        format!("PostgreSQL at {} is unreachable: {e}", self.target),
                        self.tls_hint.as_deref(),
                    ));
                }
            };
            match client.simple_query("SELECT 1").await {
                Ok(_) => Health::Serving,
                Err(e) => Health::NotServing(format!(
                    "PostgreSQL at {} failed SELECT 1: {e}",
                    self.target
                )),
            }
        };
        tokio::time::timeout(limit, check)
            .await
            .unwrap_or_else(|_| {
                Health::NotServing(format!(
                    "PostgreSQL at {} did not answer SELECT 1 within {limit:?}",
                    self.target
                ))
            })
    }

    async fn stop(&self) {
        self.purger.abort();
        if let Some(m) = &self.migrator {
            m.abort();
        }
        self.pool.close();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.purger.abort();
        if let Some(m) = &self.migrator {
            m.abort();
        }
    }
}

/// Whether the table has been created/migrated, and if not, why.
#[derive(Default)]
struct SchemaState {
    ready: AtomicBool,
    problem: std::sync::Mutex<String>,
}

impl SchemaState {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn problem(&self) -> String {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_problem(&self, why: String) {
        *self.problem.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }
}

/// One way a table set-up attempt fails.
enum Attempt {
    /// A retry cannot fix it: fail the start (or stay NOT_SERVING, saying so).
    Fatal(Error),
    /// PostgreSQL is unreachable or not answering: try again later.
    Retry(String),
}

/// What it takes to create or migrate the table.
struct Setup {
    pool: Pool,
    table: String,
    target: String,
    tls_hint: Option<String>,
    limit: Duration,
}

impl Setup {
    /// One bounded attempt; returns the version found before.
    async fn attempt(&self) -> Result<i32, Attempt> {
        let run = async {
            let mut client = self.pool.get().await.map_err(|e| match &e {
                deadpool_postgres::PoolError::Backend(pe) => match config_mistake(pe, &self.target)
                {
                    Some(fatal) => Attempt::Fatal(fatal),
                    None => Attempt::Retry(with_hint(
                        format!("PostgreSQL at {} is unreachable: {pe}", self.target),
                        self.tls_hint.as_deref(),
                    )),
                },
                _ => Attempt::Retry(with_hint(
                    format!("PostgreSQL at {} is unreachable: {e}", self.target),
                    self.tls_hint.as_deref(),
                )),
            })?;
            schema::migrate(&mut client, &self.table)
                .await
                .map_err(|e| {
                    if let schema::MigrateError::Db(pe) = &e
                        && let Some(fatal) = config_mistake(pe, &self.target)
                    {
                        return Attempt::Fatal(fatal);
                    }
                    let detail = e.to_string();
                    match Error::from(e) {
                        Error::Unavailable(_) | Error::ResourceExhausted(_) => {
                            Attempt::Retry(format!(
                                "creating the table in PostgreSQL at {} failed: {detail}",
                                self.target
                            ))
                        }
                        other => Attempt::Fatal(other),
                    }
                })
        };
        tokio::time::timeout(self.limit, run)
            .await
            .unwrap_or_else(|_| {
                Err(Attempt::Retry(format!(
                    "PostgreSQL at {} did not answer within {:?}",
                    self.target, self.limit
                )))
            })
    }

    /// Tries every second until the table is ready (or a retry cannot help).
    async fn retry(self, schema: Arc<SchemaState>) {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            match self.attempt().await {
                Ok(found) => {
                    schema.ready.store(true, Ordering::Release);
                    tracing::info!(target = %self.target, table = %self.table, from_version = found, "PostgreSQL reachable; table ready");
                    return;
                }
                Err(Attempt::Retry(why)) => {
                    tracing::debug!("{why}; retrying");
                    schema.set_problem(why);
                }
                Err(Attempt::Fatal(e)) => {
                    tracing::error!(error = %e, "cannot create the table; fix it and restart the pattern");
                    schema.set_problem(format!("{e}; fix it and restart the pattern"));
                    return;
                }
            }
        }
    }
}

/// A failure at start that a restart cannot fix — wrong password, no such
/// database, no permission to create the table — is `INVALID_ARGUMENT`, so
/// the proxy marks the pattern FAILED instead of restarting it in vain.
fn config_mistake(e: &tokio_postgres::Error, target: &str) -> Option<Error> {
    let code = e.code()?.code();
    let (field, what) = match code {
        "28000" | "28P01" => (
            "config.user",
            "PostgreSQL rejected the user or password; check config.user/password (or url)",
        ),
        "3D000" => (
            "config.dbname",
            "that database does not exist; create it, or fix config.dbname (or url)",
        ),
        "42501" => (
            "config.table",
            "the user may not create or use the table; grant it CREATE on the schema (or \
             create the table yourself, see the README), or use another user",
        ),
        _ => return None,
    };
    tracing::error!(error = %e, target = %target, sqlstate = code, "PostgreSQL refused the start");
    Some(Error::invalid_argument(field, what))
}

/// `host:port/dbname` for logs.
fn describe(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", pg.get_dbname().unwrap_or("?"))
}

/// deadpool's figures as the SDK exports them.
fn pool_status(s: deadpool_postgres::Status) -> PoolStatus {
    let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
    PoolStatus {
        idle: n(s.available),
        in_use: n(s.size.saturating_sub(s.available)),
        max: n(s.max_size),
        pending: n(s.waiting),
    }
}

/// The `error.type` of a failed query: its SQLSTATE, or what broke.
fn error_type(e: &tokio_postgres::Error) -> &str {
    match e.code() {
        Some(code) => code.code(),
        None if e.is_closed() => "closed",
        None => "connection",
    }
}

/// Deletes expired rows, then expired idempotency records, every `every`,
/// in batches, until aborted.
async fn purge(
    pool: Pool,
    [rows_sql, records_sql]: [String; 2],
    every: Duration,
    schema: Arc<SchemaState>,
    backend: Backend,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if !schema.is_ready() {
            continue;
        }
        let client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "purge skipped: no connection");
                continue;
            }
        };
        let purged = purge_batches(&client, &rows_sql, &backend, "rows").await;
        let forgotten = purge_batches(&client, &records_sql, &backend, "idempotency records").await;
        if purged + forgotten > 0 {
            tracing::debug!(
                purged,
                forgotten,
                "purged expired rows and idempotency records"
            );
        }
    }
}

/// Runs one purge statement until it deletes less than a batch (at most
/// 100 times, so a huge backlog never holds the connection for long);
/// how many it deleted.
async fn purge_batches(
    client: &deadpool_postgres::Object,
    sql: &str,
    backend: &Backend,
    what: &str,
) -> u64 {
    let mut purged = 0u64;
    for _ in 0..100 {
        let measured = backend.start("PURGE");
        let result = client
            .execute(sql, &[])
            .instrument(measured.span().clone())
            .await;
        match &result {
            Ok(_) => measured.ok(),
            Err(e) => measured.error(error_type(e)),
        }
        match result {
            Ok(n) => {
                purged += n;
                if n < schema::PURGE_BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "purging expired {what} failed; retrying next interval");
                break;
            }
        }
    }
    purged
}

impl Postgres {
    /// Runs `op` with a pooled connection, bounded by the operation timeout;
    /// the query is measured as backend operation `what`, the wait for the
    /// connection in the pool's figures.
    async fn with_client<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T, Error>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        if !self.schema.is_ready() {
            return Err(Error::unavailable(
                "the backend (PostgreSQL) has not been reachable since the pattern started; \
                 retry later",
            ));
        }
        let run = async {
            let status = self.pool.status();
            if status.available == 0 && status.size >= status.max_size {
                self.pool_metrics.waited();
            }
            let client = self.pool.get().await.map_err(|e| {
                if matches!(
                    e,
                    deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)
                ) {
                    self.pool_metrics.timed_out();
                }
                errors::pool(&e, self.pool.status(), self.acquire_timeout)
            })?;
            let measured = self.backend.start(what);
            let result = op(client).instrument(measured.span().clone()).await;
            match &result {
                Ok(_) => measured.ok(),
                Err(e) => measured.error(error_type(e)),
            }
            result.map_err(|e| errors::convert(&e, what))
        };
        tokio::time::timeout(self.op_timeout, run)
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(op = what, timeout = ?self.op_timeout, target = %self.target, "PostgreSQL did not answer in time");
                Err(Error::unavailable(format!(
                    "the backend (PostgreSQL) did not answer within {:?}; retry later",
                    self.op_timeout
                )))
            })
    }

    /// Runs `write` once per idempotency key, in one transaction
    /// (`records::once`), measured as backend operation `what`.
    async fn once(
        &self,
        what: &'static str,
        namespace: &str,
        once: &Once,
        write: records::Write<'_>,
    ) -> Result<records::Claimed, Error> {
        let queries = &self.queries;
        self.with_client(what, |mut client| async move {
            records::once(&mut client, queries, namespace, once, write).await
        })
        .await
    }
}

/// A TTL (or a retention) in whole microseconds (rounded up), as the SQL
/// expects.
fn ttl_micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_nanos().div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

impl KeyValue for Postgres {
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, Error> {
        let sql = self.queries.get.as_str();
        self.with_client("GET", |client| async move {
            let stmt = client.prepare_cached(sql).await?;
            let row = client.query_opt(&stmt, &[&namespace, &key]).await?;
            row.map(|r| r.try_get::<_, Vec<u8>>(0).map(Bytes::from))
                .transpose()
        })
        .await
    }

    async fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let sql = self.queries.put.as_str();
        let ttl = ttl.map(ttl_micros);
        self.with_client("PUT", |client| async move {
            writes::put(&client, sql, namespace, key, &value, ttl).await
        })
        .await
    }

    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, Error> {
        let sql = self.queries.delete.as_str();
        self.with_client("DELETE", |client| async move {
            writes::delete(&client, sql, namespace, key).await
        })
        .await
    }

    async fn put_once(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        once: &Once,
    ) -> Result<Outcome<()>, Error> {
        let write = records::Write::Put {
            key,
            value: &value,
            ttl: ttl.map(ttl_micros),
        };
        let claimed = self.once("PUT_ONCE", namespace, once, write).await?;
        records::outcome(claimed, once, |a| (a == records::Answer::Put).then_some(()))
    }

    async fn delete_once(
        &self,
        namespace: &str,
        key: &str,
        once: &Once,
    ) -> Result<Outcome<bool>, Error> {
        let write = records::Write::Delete { key };
        let claimed = self.once("DELETE_ONCE", namespace, once, write).await?;
        records::outcome(claimed, once, |a| match a {
            records::Answer::Deleted(d) => Some(d),
            records::Answer::Put => None,
        })
    }

    async fn list(&self, namespace: &str, query: ListQuery) -> Result<ListPage, Error> {
        let after = query
            .page_token
            .as_deref()
            .map(keys::decode_token)
            .transpose()?
            .unwrap_or_default();
        // No key contains NUL (the SDK rejects them, PostgreSQL text cannot
        // hold one), so such a prefix matches nothing.
        if query.prefix.contains('\0') {
            return Ok(ListPage::default());
        }
        let upper = keys::successor(&query.prefix);
        let limit = i64::try_from(query.page_size + 1).unwrap_or(i64::MAX);
        let sql = self.queries.list.as_str();
        let prefix = query.prefix.as_str();
        let rows = self
            .with_client("LIST", |client| async move {
                let stmt = client.prepare_cached(sql).await?;
                let rows = client
                    .query(&stmt, &[&namespace, &prefix, &upper, &after, &limit])
                    .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, Vec<u8>>(1)?)))
                    .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            })
            .await?;
        Ok(ListPage::fill(
            rows.into_iter()
                .map(|(key, value)| (key, Bytes::from(value))),
            query.page_size,
            keys::encode_token,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<Config, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn config_defaults_and_durations() {
        let c = config("{}").unwrap();
        assert_eq!(c.table, "trellis_kv");
        assert_eq!(c.pool.max_size, 16);
        assert_eq!(c.pool.acquire_timeout, Duration::from_secs(1));
        let c = config(r#"{"pool": {"max_size": 2, "acquire_timeout": "200ms"}}"#).unwrap();
        assert_eq!(c.pool.max_size, 2);
        assert_eq!(c.pool.acquire_timeout, Duration::from_millis(200));
        assert!(config(r#"{"pool": {"maxsize": 2}}"#).is_err());
    }

    #[test]
    fn connection_settings_from_fields_or_url() {
        let pg = config(r#"{"host": "db", "port": 6000, "dbname": "kv"}"#)
            .unwrap()
            .pg_config(&|_| None)
            .unwrap();
        assert_eq!(describe(&pg), "db:6000/kv");
        assert_eq!(pg.get_user(), Some("postgres"));
        assert_eq!(pg.get_options(), Some("-c statement_timeout=5000"));
        let pg = config(r#"{"url": "postgres://u:secret@h:7000/d"}"#)
            .unwrap()
            .pg_config(&|_| None)
            .unwrap();
        assert_eq!(describe(&pg), "h:7000/d");
        assert!(!describe(&pg).contains("secret"));
    }

    #[test]
    fn pgpassword_fills_in_only_a_missing_password() {
        let from_env = |json: &str, env: Option<&str>| {
            config(json)
                .unwrap()
                .pg_config(&|name| {
                    (name == PASSWORD_ENV)
                        .then(|| env.map(str::to_string))
                        .flatten()
                })
                .unwrap()
                .get_password()
                .map(<[u8]>::to_vec)
        };
        assert_eq!(
            from_env(r#"{"host": "db"}"#, Some("s3")),
            Some(b"s3".to_vec())
        );
        assert_eq!(
            from_env(r#"{"url": "postgres://u@h/d"}"#, Some("s3")),
            Some(b"s3".to_vec())
        );
        assert_eq!(
            from_env(r#"{"password": "file"}"#, Some("s3")),
            Some(b"file".to_vec()),
            "config.password wins over PGPASSWORD"
        );
        assert_eq!(
            from_env(r#"{"url": "postgres://u:url@h/d"}"#, Some("s3")),
            Some(b"url".to_vec()),
            "the url's password wins over PGPASSWORD"
        );
        assert_eq!(from_env(r#"{"host": "db"}"#, Some("")), None);
        assert_eq!(from_env(r#"{"host": "db"}"#, None), None);
    }

    #[test]
    fn a_password_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let env = |name: &str| match name {
            "APP_PW" => Some("from-env".to_string()),
            PASSWORD_ENV => Some("pgpassword".to_string()),
            _ => None,
        };
        let c = Config {
            password_file: Some(file.clone()),
            ..Config::default()
        };
        let pg = c.pg_config(&env).unwrap();
        assert_eq!(pg.get_password(), Some(&b"from-file"[..]));
        let c = config(r#"{"password_env": "APP_PW"}"#).unwrap();
        assert_eq!(
            c.pg_config(&env).unwrap().get_password(),
            Some(&b"from-env"[..])
        );
        let c = config(r#"{"url": "postgres://u:inline@h/d", "password_env": "APP_PW"}"#).unwrap();
        let e = c.pg_config(&env).unwrap_err();
        assert_eq!(e[0].field, "config.password_env");
        let c = config(r#"{"password_file": "/nonexistent/pw"}"#).unwrap();
        let e = c.pg_config(&env).unwrap_err();
        assert_eq!(e[0].field, "config.password_file");
        assert!(
            e[0].message.starts_with("cannot read /nonexistent/pw"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn tls_modes_and_their_files() {
        let c = config(r#"{"url": "postgres://u@h/d?sslmode=require"}"#).unwrap();
        let e = c.pg_config(&|_| None).unwrap_err();
        assert!(
            e[0].message.contains("needs a tls: block"),
            "{}",
            e[0].message
        );
        let c = config(r#"{"host": "h", "tls": {"ca_file": "/nonexistent/ca.pem"}}"#).unwrap();
        assert_eq!(
            c.pg_config(&|_| None).unwrap().get_ssl_mode(),
            SslMode::Require
        );
        let e = c.tls_config().unwrap_err();
        assert_eq!(e[0].field, "config.tls.ca_file");
        assert!(
            e[0].message
                .starts_with("cannot read /nonexistent/ca.pem: No such file")
        );
        let c = config(r#"{"host": "h", "tls": {"mode": "disable", "ca_file": "/x"}}"#).unwrap();
        assert_eq!(
            c.pg_config(&|_| None).unwrap().get_ssl_mode(),
            SslMode::Disable
        );
        assert!(c.tls_config().unwrap().is_none());
        assert!(config(r#"{"tls": {"mode": "require"}}"#).is_err());
    }

    #[test]
    fn every_config_problem_is_reported() {
        let c = config(
            r#"{"url": "postgres://h/d", "host": "x", "table": "Bad-Name",
                "pool": {"max_size": 0, "acquire_timeout": "0s"}, "purge_interval": "0s"}"#,
        )
        .unwrap();
        let fields: Vec<String> = c
            .pg_config(&|_| None)
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "config.url",
                "config.table",
                "config.pool.max_size",
                "config.pool.acquire_timeout",
                "config.purge_interval"
            ]
        );
    }

    #[test]
    fn ttls_round_up_to_a_microsecond() {
        assert_eq!(ttl_micros(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_micros(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(ttl_micros(Duration::MAX), i64::MAX);
    }

    #[tokio::test]
    async fn unreachable_database_at_start_starts_not_serving() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let c = Config {
            port: Some(port),
            ..Config::default()
        };
        let ctx = InitContext::new("p");
        let pattern = match Postgres::init(c, ctx.clone()).await {
            Ok(p) => p,
            Err(e) => panic!("PostgreSQL being down must not fail the start: {e:?}"),
        };
        match pattern.health().await {
            Health::NotServing(why) => assert!(why.contains("not ready"), "{why}"),
            Health::Serving => panic!("SERVING with PostgreSQL down"),
        }
        match pattern.get("ns", "k").await {
            Err(Error::Unavailable(msg)) => {
                assert!(msg.contains("retry later"), "{msg}");
                assert!(!msg.contains("127.0.0.1"), "no address leaks: {msg}");
            }
            other => panic!("want Unavailable, got {other:?}"),
        }
        // The pool's figures are exported from the start.
        let metrics = ctx.metrics_text();
        for want in [
            "pattern_pool_max_connections 16",
            r#"pattern_pool_connections{state="in_use"} 0"#,
            "pattern_pool_waits_total 0",
        ] {
            assert!(metrics.lines().any(|l| l == want), "{want} in {metrics}");
        }
        pattern.stop().await;
    }
}
