//! trellis-redis: a key-value pattern that keeps its data in Redis, written
//! only against `pattern-sdk` and the `redis` crate.
//!
//! - One [`ConnectionManager`] (a multiplexed connection that reconnects by
//!   itself) is shared by every request; each operation is bounded by
//!   `connect_timeout + response_timeout`, so a request answers
//!   `UNAVAILABLE` instead of hanging while Redis is down.
//! - TTLs are Redis's own key expiry (`SET … PX`).
//! - `List` pages through a per-namespace sorted-set index in key order
//!   (`keys.rs` has the layout, `scripts.rs` the Lua that keeps value and
//!   index in step). See README.md for why.
//! - Health is a `PING`: `NOT_SERVING` while Redis is unreachable, `SERVING`
//!   again once it answers. The pattern never exits because Redis is down.
//! - TLS with a `rediss://` url: the server's certificate must chain to
//!   `tls.ca_file` (or the system's roots) and name the url's host; a
//!   client certificate for mutual TLS. The AUTH password comes from
//!   `password_file` or `password_env` (backend-config); a password in the
//!   url still works and is never logged (logs show `host:port` only). A
//!   failed handshake is `NOT_SERVING` with a message naming
//!   `config.tls.ca_file`.
//! - Idempotency keys (`put_once`, `delete_once`): one script per call
//!   checks the key's record (`P{ns}:idem:{key}`), and if there is none
//!   does the write and then `SET`s the record with the retention as its
//!   `PX` expiry, atomically; so a crash cannot separate the write from its
//!   record, several pattern instances on one Redis share the records, and
//!   Redis expires them (no sweeper).
//! - Every command and script runs through the SDK's
//!   [`Backend`](pattern_sdk::observe::Backend) (`GET`, and the scripts
//!   `PUT`, `DELETE`, `PUT_ONCE`, `DELETE_ONCE`, `LIST`): a latency
//!   histogram by outcome and a span each. The multiplexed connection is exported as a pool of one
//!   (`in_use` while a command is in flight). Health `PING`s are not
//!   counted.

mod keys;
mod scripts;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use backend_config::{Tls, read_secret};
use bytes::Bytes;
use pattern_sdk::idempotency::{Once, Outcome};
use pattern_sdk::observe::{Backend, PoolStatus};
use pattern_sdk::{
    Error, FieldViolation, Health, InitContext, KeyValue, ListPage, ListQuery, Pattern,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    ClientTlsConfig, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError, Script,
    ScriptInvocation, ServerErrorKind, TlsCertificates,
};
use serde::Deserialize;
use tracing::Instrument;

pub use keys::Namespace;

/// How long a health check may take; below the SDK's 1 s bound on the hook.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(800);
/// The most index entries one `List` call looks at (dead ones included),
/// so a page never blocks Redis for long; a page may then be short.
const LIST_SCAN_BUDGET: usize = 2000;
/// The longest an idempotency record is kept (a retention beyond it is
/// cut to it): 100 years, far past any policy's, and far from the end of
/// Redis's expiry clock, which refuses a `PX` that overflows it.
const MAX_RECORD_MS: u128 = 100 * 365 * 24 * 3600 * 1000;
/// The `config:` block of a redis entry in the proxy configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where Redis is: `redis://[:password@]host:port[/db]`,
    /// `rediss://host:port[/db]` (TLS), or `redis+unix:///path/to/socket`.
    pub url: String,
    /// TLS settings for a `rediss://` url: `ca_file`, and `cert_file` +
    /// `key_file` for mutual TLS. Without it a `rediss://` url trusts the
    /// system's roots.
    pub tls: Option<Tls>,
    /// The ACL user to AUTH as (Redis 6+); default: the url's, else none.
    pub username: Option<String>,
    /// A file holding the AUTH password (one trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the AUTH password.
    pub password_env: Option<String>,
    /// Put in front of every Redis key this pattern writes, so several
    /// patterns (or other programs) can share one Redis.
    pub key_prefix: String,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long Redis may take to answer one command.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            tls: None,
            username: None,
            password_file: None,
            password_env: None,
            key_prefix: "trellis:".into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// The Redis client these settings describe, or every problem with
    /// them. `lookup` reads the environment (for `password_env`).
    fn client(
        &self,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<redis::Client, Vec<FieldViolation>> {
        let mut problems = Vec::new();
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| {
                problems.push(FieldViolation::new(
                    "config.url",
                    format!(
                        "is not a Redis URL ({}); write e.g. redis://127.0.0.1:6379, \
                         rediss://host:6380 (TLS) or redis+unix:///path/to/socket",
                        e.category()
                    ),
                ))
            })
            .ok();
        let password = read_secret(
            ("config.password_file", self.password_file.as_deref()),
            ("config.password_env", self.password_env.as_deref()),
            lookup,
        )
        .map_err(|v| problems.push(v))
        .ok()
        .flatten();
        let files = match self.tls.as_ref().map(|t| t.load("config.tls")) {
            Some(Ok(files)) => Some(files),
            Some(Err(v)) => {
                problems.extend(v);
                None
            }
            None => None,
        };
        for (field, value) in [
            ("config.connect_timeout", self.connect_timeout),
            ("config.response_timeout", self.response_timeout),
        ] {
            if value.is_zero() {
                problems.push(FieldViolation::new(
                    field,
                    "must be longer than zero, e.g. \"1s\"",
                ));
            }
        }
        let Some(info) = info else {
            return Err(problems);
        };
        let tls_url = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        if self.tls.is_some() && !tls_url {
            problems.push(FieldViolation::new(
                "config.tls",
                "needs a rediss:// url (TLS); config.url is not one",
            ));
        }
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = password {
            if settings.password().is_some() {
                let field = if self.password_file.is_some() {
                    "config.password_file"
                } else {
                    "config.password_env"
                };
                problems.push(FieldViolation::new(
                    field,
                    "config.url has a password too; remove it from the url",
                ));
            }
            settings = settings.set_password(password.expose());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let info = info.set_redis_settings(settings);
        let built = match files {
            Some(files) => redis::Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: files.client.map(|id| ClientTlsConfig {
                        client_cert: id.cert_pem,
                        client_key: id.key_pem,
                    }),
                    root_cert: files.ca.map(|(pem, _)| pem),
                },
            ),
            None => redis::Client::open(info),
        };
        built.map_err(|e| {
            vec![FieldViolation::new(
                if self.tls.is_some() {
                    "config.tls"
                } else {
                    "config.url"
                },
                format!("cannot build the Redis client: {e}"),
            )]
        })
    }
}

pub struct RedisKv {
    conn: ConnectionManager,
    key_prefix: String,
    /// Bound on one operation, reconnecting included.
    op_timeout: Duration,
    /// `host:port` (never the password), for logs.
    addr: String,
    /// Times and traces every command.
    backend: Backend,
    /// With a `rediss://` url: what to check when the handshake fails.
    tls_hint: Option<String>,
}

impl Pattern for RedisKv {
    type Config = Config;
    const NAME: &'static str = "redis";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    async fn init(config: Config, ctx: InitContext) -> Result<Self, Error> {
        // redis's rustls connector takes the process's crypto provider:
        // make it `ring`, whatever else the build enables.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = config
            .client(&|name| std::env::var(name).ok())
            .map_err(Error::InvalidArgument)?;
        let addr = client.get_connection_info().addr().to_string();
        let tls_hint = matches!(
            client.get_connection_info().addr(),
            ConnectionAddr::TcpTls { .. }
        )
        .then(|| backend_config::tls_hint("config.tls", config.tls.as_ref(), "config.url"));
        // One connection attempt per command while Redis is down (the next
        // command tries again), so no request waits out a retry series.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| Error::internal(format!("cannot create the Redis connection: {e}")))?;
        let backend = ctx.backend("redis");
        // One multiplexed connection: commands never wait for a
        // connection, so the pool is one, in use while any command is.
        ctx.pool({
            let backend = backend.clone();
            move || {
                let busy = u64::from(backend.in_flight() > 0);
                PoolStatus {
                    idle: 1 - busy,
                    in_use: busy,
                    max: 1,
                    pending: 0,
                }
            }
        });
        let pattern = Self {
            conn,
            key_prefix: config.key_prefix,
            op_timeout: config.connect_timeout + config.response_timeout,
            addr,
            backend,
            tls_hint,
        };
        // Redis down at start is not a reason to fail: the pattern starts,
        // answers NOT_SERVING (the proxy keeps it, not routable) and serves
        // as soon as Redis answers.
        match pattern.health().await {
            Health::Serving => {
                tracing::info!(pattern = ctx.name(), addr = %pattern.addr, prefix = %pattern.key_prefix, "connected to Redis");
            }
            Health::NotServing(why) => {
                tracing::warn!(
                    pattern = ctx.name(),
                    addr = %pattern.addr,
                    "{why}; starting anyway, NOT_SERVING until Redis answers (is it running? \
                     are config.url and config.tls right?)"
                );
            }
        }
        Ok(pattern)
    }

    async fn health(&self) -> Health {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let limit = HEALTH_TIMEOUT.min(self.op_timeout);
        match tokio::time::timeout(limit, ping.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Health::Serving,
            Ok(Err(e)) => {
                let mut why = format!("Redis at {} is unreachable: {e}", self.addr);
                if let Some(hint) = &self.tls_hint
                    && backend_config::looks_like_tls(&why)
                {
                    why = format!("{why}; {hint}");
                }
                Health::NotServing(why)
            }
            Err(_) => Health::NotServing(format!(
                "Redis at {} did not answer PING within {limit:?}",
                self.addr
            )),
        }
    }
}

impl RedisKv {
    fn namespace(&self, namespace: &str) -> Namespace {
        Namespace::new(&self.key_prefix, namespace)
    }

    /// Runs one Redis operation within the operation timeout, measured as
    /// backend operation `what`, converting its error.
    async fn run<T>(
        &self,
        what: &'static str,
        op: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, Error> {
        let measured = self.backend.start(what);
        let op = op.instrument(measured.span().clone());
        match tokio::time::timeout(self.op_timeout, op).await {
            Ok(Ok(v)) => {
                measured.ok();
                Ok(v)
            }
            Ok(Err(e)) => {
                measured.error(e.code().unwrap_or_else(|| e.category()));
                Err(self.convert(what, e))
            }
            Err(_) => {
                measured.error("timeout");
                tracing::warn!(addr = %self.addr, op = what, timeout = ?self.op_timeout, "Redis did not answer in time");
                Err(Error::unavailable(format!(
                    "the backend (Redis) did not answer within {:?}; it may be down or \
                     overloaded; retry later",
                    self.op_timeout
                )))
            }
        }
    }

    /// Maps a Redis error to what the caller should do about it; the detail
    /// (address, server message) goes to the log only.
    fn convert(&self, what: &str, e: RedisError) -> Error {
        let retryable = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || matches!(
                e.kind(),
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::ClusterDown
                )
            )
            || matches!(e.code(), Some("BUSY"));
        if retryable {
            tracing::warn!(addr = %self.addr, op = what, error = %e, "Redis unavailable");
            return Error::unavailable(
                "the backend (Redis) is unavailable; retry later (the pattern reconnects by itself)",
            );
        }
        if e.code() == Some("OOM") {
            tracing::warn!(addr = %self.addr, op = what, error = %e, "Redis is out of memory");
            return Error::resource_exhausted(
                "the backend (Redis) is out of memory (maxmemory reached); delete keys, give \
                 them a ttl, or raise Redis's maxmemory",
            );
        }
        Error::internal(format!("Redis {what} at {} failed: {e}", self.addr))
    }
}

/// A TTL in whole milliseconds, rounded up so a tiny TTL still expires
/// rather than meaning "none".
fn ttl_millis(ttl: Duration) -> u128 {
    ttl.as_nanos().div_ceil(1_000_000).max(1)
}

/// An idempotency record's retention as `SET … PX` takes it: at least 1 ms
/// (`PX 0` is an error) and at most [`MAX_RECORD_MS`].
fn retention_millis(retention: Duration) -> u128 {
    ttl_millis(retention).min(MAX_RECORD_MS)
}

/// The [`PUT`](scripts::PUT) call, or the start of a [`PUT_ONCE`](scripts::PUT_ONCE) one.
fn put_call<'a>(
    script: &'a Script,
    ns: &Namespace,
    key: &str,
    value: &[u8],
    ttl: Option<Duration>,
) -> ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    call.key(ns.value_key(key))
        .key(&ns.index)
        .key(&ns.expiry)
        .arg(key)
        .arg(value)
        .arg(ttl.map_or(0, ttl_millis).to_string())
        .arg(&ns.value_prefix);
    call
}

/// The [`DELETE`](scripts::DELETE) call, or the start of a
/// [`DELETE_ONCE`](scripts::DELETE_ONCE) one.
fn delete_call<'a>(script: &'a Script, ns: &Namespace, key: &str) -> ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    call.key(ns.value_key(key))
        .key(&ns.index)
        .key(&ns.expiry)
        .arg(key);
    call
}

/// Makes a plain write's call a once one: the record's key, the claim
/// (`method` and the fingerprint: a record answers only the same method
/// and request) and the retention go last, as the once scripts want them.
fn add_once(call: &mut ScriptInvocation<'_>, ns: &Namespace, method: &str, once: &Once) {
    let (record, claim, retention) = once_args(ns, method, once);
    call.key(record).arg(claim).arg(retention);
}

/// What [`add_once`] adds: the record's key, the claim, the retention in ms.
fn once_args(ns: &Namespace, method: &str, once: &Once) -> (String, String, String) {
    (
        ns.record_key(&once.key),
        format!("{method} {}", once.fingerprint),
        retention_millis(once.retention).to_string(),
    )
}

/// The [`Outcome`] of a once script's reply `(outcome, result)`; `answer`
/// turns the write's integer result into the method's answer.
fn outcome<T>(reply: (i64, i64), answer: impl FnOnce(i64) -> T) -> Result<Outcome<T>, Error> {
    match reply {
        (scripts::EXECUTED, result) => Ok(Outcome::Executed(answer(result))),
        (scripts::REPLAYED, result) => Ok(Outcome::Replayed(answer(result))),
        (scripts::REUSED, _) => Ok(Outcome::Reused),
        (other, _) => Err(Error::internal(format!(
            "an idempotent write's script answered outcome {other}, which trellis-redis does not \
             know"
        ))),
    }
}

impl KeyValue for RedisKv {
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, Error> {
        let key = self.namespace(namespace).value_key(key);
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = self
            .run("GET", redis::cmd("GET").arg(&key).query_async(&mut conn))
            .await?;
        Ok(value.map(Bytes::from))
    }

    async fn put(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let ns = self.namespace(namespace);
        let mut conn = self.conn.clone();
        let call = put_call(&scripts::PUT, &ns, key, &value, ttl);
        let _: i64 = self.run("PUT", call.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, Error> {
        let ns = self.namespace(namespace);
        let mut conn = self.conn.clone();
        let call = delete_call(&scripts::DELETE, &ns, key);
        let removed: i64 = self.run("DELETE", call.invoke_async(&mut conn)).await?;
        Ok(removed > 0)
    }

    async fn put_once(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        once: &Once,
    ) -> Result<Outcome<()>, Error> {
        let ns = self.namespace(namespace);
        let mut conn = self.conn.clone();
        let mut call = put_call(&scripts::PUT_ONCE, &ns, key, &value, ttl);
        add_once(&mut call, &ns, "PUT", once);
        let reply = self.run("PUT_ONCE", call.invoke_async(&mut conn)).await?;
        outcome(reply, |_| ())
    }

    async fn delete_once(
        &self,
        namespace: &str,
        key: &str,
        once: &Once,
    ) -> Result<Outcome<bool>, Error> {
        let ns = self.namespace(namespace);
        let mut conn = self.conn.clone();
        let mut call = delete_call(&scripts::DELETE_ONCE, &ns, key);
        add_once(&mut call, &ns, "DELETE", once);
        let reply = self
            .run("DELETE_ONCE", call.invoke_async(&mut conn))
            .await?;
        outcome(reply, |removed| removed > 0)
    }

    async fn list(&self, namespace: &str, query: ListQuery) -> Result<ListPage, Error> {
        let after = query
            .page_token
            .as_deref()
            .map(keys::decode_token)
            .transpose()?;
        let ns = self.namespace(namespace);
        let (min, max) = keys::lex_range(&query.prefix, after.as_deref());
        let mut conn = self.conn.clone();
        let mut call = scripts::LIST.prepare_invoke();
        call.key(&ns.index)
            .key(&ns.expiry)
            .arg(&ns.value_prefix)
            .arg(min)
            .arg(max)
            .arg(query.page_size)
            .arg(LIST_SCAN_BUDGET.max(query.page_size + 1))
            .arg(pattern_sdk::validate::MAX_PAGE_BYTES);
        let (more, cursor, flat): (i64, Option<Vec<u8>>, Vec<Vec<u8>>) =
            self.run("LIST", call.invoke_async(&mut conn)).await?;
        let mut entries = Vec::with_capacity(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let (Some(key), Some(value)) = (flat.next(), flat.next()) {
            // Keys were written from `&str`, so they are UTF-8 unless
            // something else wrote into this pattern's keyspace.
            let key = String::from_utf8(key).map_err(|e| {
                Error::internal(format!(
                    "a key in the index {} is not UTF-8 ({e}); something other than \
                     trellis-redis wrote there",
                    ns.index
                ))
            })?;
            entries.push((key, Bytes::from(value)));
        }
        let next_page_token = match cursor {
            Some(cursor) if more != 0 => Some(keys::encode_token(&cursor)),
            _ => None,
        };
        Ok(ListPage {
            entries,
            next_page_token,
        })
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
        assert_eq!(c.url, "redis://127.0.0.1:6379");
        assert_eq!(c.key_prefix, "trellis:");
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        let c = config(r#"{"url": "redis://h:1", "response_timeout": "250ms"}"#).unwrap();
        assert_eq!(c.response_timeout, Duration::from_millis(250));
        assert!(config(r#"{"urll": "x"}"#).is_err());
    }

    #[tokio::test]
    async fn init_reports_every_bad_field() {
        let bad = Config {
            url: "http://nope".into(),
            connect_timeout: Duration::ZERO,
            ..Config::default()
        };
        match RedisKv::init(bad, InitContext::new("r")).await {
            Err(Error::InvalidArgument(v)) => {
                let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(fields, ["config.url", "config.connect_timeout"]);
                assert!(v[0].message.contains("redis://"), "{}", v[0].message);
            }
            Err(other) => panic!("want InvalidArgument, got {other:?}"),
            Ok(_) => panic!("want InvalidArgument, got a pattern"),
        }
    }

    fn problems(c: &Config, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        match c.client(env) {
            Ok(_) => Vec::new(),
            Err(v) => v
                .iter()
                .map(|v| format!("{}: {}", v.field, v.message))
                .collect(),
        }
    }

    #[test]
    fn tls_and_credentials_are_checked_and_named() {
        let no_env = |_: &str| None;
        let c =
            config(r#"{"url": "redis://h:1", "tls": {"ca_file": "/nonexistent/ca.pem"}}"#).unwrap();
        let p = problems(&c, &no_env);
        assert!(
            p[0].starts_with("config.tls.ca_file: cannot read /nonexistent/ca.pem: No such file"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("config.tls: needs a rediss:// url"),
            "{p:?}"
        );

        let c = config(r#"{"url": "redis://:inline@h:1", "password_env": "PW"}"#).unwrap();
        let p = problems(&c, &|_| Some("from-env".into()));
        assert_eq!(
            p,
            ["config.password_env: config.url has a password too; remove it from the url"]
        );
        let c = config(r#"{"url": "redis://h:1", "password_env": "PW"}"#).unwrap();
        let p = problems(&c, &no_env);
        assert!(p[0].contains("PW is not set"), "{p:?}");

        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let c = Config {
            url: "rediss://127.0.0.1:1".into(),
            username: Some("app".into()),
            password_file: Some(pw),
            ..Config::default()
        };
        let client = c.client(&no_env).expect("a rediss:// client");
        let settings = client.get_connection_info().redis_settings();
        assert_eq!(settings.password(), Some("s3cret"));
        assert_eq!(settings.username(), Some("app"));
    }

    #[tokio::test]
    async fn unreachable_redis_at_start_starts_not_serving() {
        // A port nothing listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let cfg = Config {
            url: format!("redis://127.0.0.1:{port}"),
            ..Config::default()
        };
        let ctx = InitContext::new("r");
        let pattern = match RedisKv::init(cfg, ctx.clone()).await {
            Ok(p) => p,
            Err(e) => panic!("Redis being down must not fail the start: {e:?}"),
        };
        match pattern.health().await {
            Health::NotServing(why) => assert!(why.contains("unreachable"), "{why}"),
            Health::Serving => panic!("SERVING with Redis down"),
        }
        match pattern.get("ns", "k").await {
            Err(Error::Unavailable(msg)) => {
                assert!(msg.contains("retry later"), "{msg}");
                assert!(!msg.contains("127.0.0.1"), "no address leaks: {msg}");
            }
            other => panic!("want Unavailable, got {other:?}"),
        }
        // The failed GET is counted (the health PING is not), and the one
        // connection is idle again.
        let metrics = ctx.metrics_text();
        for want in [
            r#"pattern_backend_operation_duration_seconds_count{operation="GET",outcome="error"} 1"#,
            r#"pattern_pool_connections{state="idle"} 1"#,
            r#"pattern_pool_connections{state="in_use"} 0"#,
            "pattern_pool_max_connections 1",
        ] {
            assert!(metrics.lines().any(|l| l == want), "{want} in {metrics}");
        }
        assert!(!metrics.contains("PING"), "{metrics}");
    }

    #[test]
    fn ttls_round_up_to_a_millisecond() {
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_millis(Duration::from_secs(3)), 3000);
    }

    #[test]
    fn retentions_are_a_valid_px() {
        assert_eq!(retention_millis(Duration::ZERO), 1);
        assert_eq!(retention_millis(Duration::from_secs(2)), 2000);
        assert_eq!(retention_millis(Duration::MAX), MAX_RECORD_MS);
        assert!(MAX_RECORD_MS < i64::MAX as u128 / 2);
    }

    #[test]
    fn once_replies_become_outcomes() {
        let deleted = |n: i64| n > 0;
        assert_eq!(
            outcome((scripts::EXECUTED, 1), deleted).unwrap(),
            Outcome::Executed(true)
        );
        assert_eq!(
            outcome((scripts::REPLAYED, 0), deleted).unwrap(),
            Outcome::Replayed(false)
        );
        assert_eq!(
            outcome((scripts::REUSED, 0), deleted).unwrap(),
            Outcome::Reused
        );
        assert!(matches!(outcome((7, 0), deleted), Err(Error::Internal(_))));
    }

    #[test]
    fn once_calls_append_the_record_key_the_claim_and_the_retention() {
        let ns = Namespace::new("p:", "ns");
        let once = Once {
            key: "req-1".into(),
            fingerprint: "ab12".into(),
            retention: Duration::from_millis(1500),
        };
        assert_eq!(
            once_args(&ns, "DELETE", &once),
            (
                "p:ns:idem:req-1".to_string(),
                "DELETE ab12".to_string(),
                "1500".to_string()
            )
        );
        // One key and two arguments more than the plain call: the scripts
        // find them as KEYS[#KEYS], ARGV[#ARGV - 1] and ARGV[#ARGV].
        let mut call = delete_call(&scripts::DELETE_ONCE, &ns, "k");
        add_once(&mut call, &ns, "DELETE", &once);
        let shown = format!("{call:?}");
        assert!(shown.contains("args: 3, keys: 4"), "{shown}");
        let mut call = put_call(&scripts::PUT_ONCE, &ns, "k", b"v", None);
        add_once(&mut call, &ns, "PUT", &once);
        let shown = format!("{call:?}");
        assert!(shown.contains("args: 6, keys: 4"), "{shown}");
    }
}
