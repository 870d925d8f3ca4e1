//! `make bench-chaos`: random SIGKILLs under a steady mixed load, with
//! traffic policies on. Bounded in time (`CHAOS_SECS`, default 120), it
//! prints its figures and ends PASS or FAIL (exit 1).
//!
//! One release `trellis` serves four namespaces, each under the policy
//! [`POLICY`] (timeout 2 s, 3 attempts, a breaker, 64 in flight):
//!
//! - `mem`: `trellis-memstore` (pattern `mem`);
//! - `kvredis`: `trellis-redis` (pattern `redis`) on a private Redis
//!   (`appendfsync always`: an acknowledged write is on disk);
//! - `kvpg`: `trellis-postgres` (pattern `pg`) on a private PostgreSQL
//!   (`fsync=on`, synchronous commit);
//! - `events`: `trellis-nats` (pattern `nats`) on a private NATS server.
//!
//! `CHAOS_REDIS_REPLICAS=3` runs the `redis` pattern as three replicas
//! (docs/configuration.md, "Replicas"); a kill of "pattern redis" then
//! kills one replica at random. With the same `CHAOS_SEED` the kills fall
//! at the same times on the same targets, so two runs compare what the
//! replicas change for `kvredis`.
//!
//! Every pattern entry carries [`RESTART`]: the crash-loop breaker's
//! defaults (5 starts a minute) would otherwise leave a pattern the chaos
//! kills often FAILED, waiting for an operator.
//!
//! The load, each worker on an HTTP/2 connection of its own, one call
//! every [`PACE`] at most: [`KV_WORKERS`] per key-value namespace doing Put
//! (unique key, value = key: 40 %), Put and later Delete of scratch keys
//! (10 % each; acknowledged keys are never deleted), Get (30 %: of an
//! acknowledged key, whose value must match, or of a missing one) and List
//! (10 %); [`PUBLISHERS`] publishers and [`SUBSCRIBERS`] subscribers on
//! `events` (a subscriber whose stream ends subscribes again). Every unary
//! call carries a client deadline ([`UNARY_DEADLINE`], as `grpc-timeout`), a
//! Subscribe [`SUBSCRIBE_DEADLINE`] to open; the client measures each
//! call's wall time from send to answer (the client is tonic's stubs over a
//! bare hyper HTTP/2 connection, `trellis_tests::soak::H2Channel`, which
//! does not enforce `grpc-timeout` itself, so the proxy's answer is what
//! is timed). A call still unanswered
//! [`GUARD`] past its deadline is cut off and counted as hung.
//!
//! The chaos (seeded: `CHAOS_SEED`, printed): every 2–6 s, one of seven
//! targets at random: SIGKILL of one of the four pattern processes (pid
//! from the admin API), or of the Redis, PostgreSQL or NATS server, which
//! comes back 0.5–3 s later on the same port and data. PostgreSQL is
//! killed whole: SIGKILL to the postmaster and every process of the
//! cluster (crash recovery on restart), not the SIGQUIT of
//! `pg_ctl stop -m immediate`.
//!
//! After the load: every server up, every pattern SERVING, then every
//! acknowledged Put is read back through the proxy (and for Redis and
//! PostgreSQL directly from the server too). Memstore keeps its data in
//! memory, so a SIGKILL loses it by design: only its writes sent after its
//! current process started are checked. Then SIGTERM to the proxy, and
//! every pattern pid ever seen must be gone, and the proxy's log must hold
//! no `panicked`.
//!
//! PASS needs: 0 acknowledged writes lost, 0 calls answered more than
//! [`OVERRUN_BOUND`] after their deadline (hung ones included), 0 orphan
//! processes, 0 panics in the proxy.
//!
//! Needs `redis-server`, `nats-server` and PostgreSQL (`make setup`) and
//! release binaries: `cargo build --release --workspace --bins` first
//! (`make bench-chaos` does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tonic_types::StatusExt;
use trellis_proto::admin::v1 as admin;
use trellis_proto::admin::v1::PatternState;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{
    DeleteRequest, GetRequest, ListRequest, PublishRequest, PutRequest, SubscribeRequest,
};
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};
use trellis_tests::nats::{NatsServer, nats_pattern};
use trellis_tests::soak::H2Channel;
use trellis_tests::{Proxy, children_of, process_gone, target_dir};

const DEFAULT_SECS: u64 = 120;
/// The deadline every unary call carries.
const UNARY_DEADLINE: Duration = Duration::from_secs(1);
/// The deadline a Subscribe carries (it bounds the stream until it opens).
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(2);
/// A call answered later than this after its deadline counts against PASS.
const OVERRUN_BOUND: Duration = Duration::from_millis(100);
/// A call unanswered this long after its deadline is cut off: hung.
const GUARD: Duration = Duration::from_secs(15);
/// Workers per key-value namespace.
const KV_WORKERS: usize = 3;
const PUBLISHERS: usize = 2;
const SUBSCRIBERS: usize = 3;
/// The pause after each call of a worker.
const PACE: Duration = Duration::from_millis(10);
/// How long the recovery (servers up, patterns SERVING) may take.
const RECOVERY: Duration = Duration::from_secs(90);

/// The policy every namespace names.
const POLICY: &str = "policies:
  chaos:
    timeout: 2s
    retries: { max_attempts: 3, initial_backoff: 20ms }
    circuit_breaker: { consecutive_failures: 5, open_for: 1s, probes: 2 }
    concurrency: { max_in_flight: 64 }";
/// Every pattern entry's restart settings: quick restarts, no crash-loop
/// breaker within the run.
const RESTART: &str = "restart:\n  max_backoff: 1s\n  max_starts: 1000";

const NS_MEM: &str = "mem";
const NS_REDIS: &str = "kvredis";
const NS_PG: &str = "kvpg";
const NS_EVENTS: &str = "events";
/// (namespace, pattern) of the key-value namespaces.
const KV: [(&str, &str); 3] = [(NS_MEM, "mem"), (NS_REDIS, "redis"), (NS_PG, "pg")];
const PATTERNS: [&str; 4] = ["mem", "redis", "pg", "nats"];
const REDIS_PREFIX: &str = "chaos:";
const TOPIC: &str = "chaos";

/// The refusal and failure reasons the summary always lists, seen or not.
const REASONS: [&str; 6] = [
    "CIRCUIT_OPEN",
    "CONCURRENCY_LIMIT",
    "RATE_LIMITED",
    "PROXY_OVERLOADED",
    "PATTERN_UNAVAILABLE",
    "PATTERN_TIMEOUT",
];

// --- small things --------------------------------------------------------------

/// Seconds since the load started (0 before).
fn now() -> f64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// SplitMix64: a seeded generator, enough for choosing what to kill.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration uniform in [lo, hi] milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    /// Another generator, for worker `n`.
    fn fork(&self, n: u64) -> Rng {
        let mut r = Rng(self.0 ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let t = v.trim().replace('_', "");
    let parsed = match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")))
}

// --- what the workers count ------------------------------------------------------

/// `OK`, a code name, or `CODE/REASON` when the status carried an ErrorInfo.
fn outcome_of(status: &tonic::Status) -> String {
    let code = trellis_proto::code_name(status.code());
    match status.get_details_error_info() {
        Some(info) if !info.reason.is_empty() => format!("{code}/{}", info.reason),
        _ => code.to_string(),
    }
}

/// A call answered later than its deadline + [`OVERRUN_BOUND`].
#[derive(Clone, Debug)]
struct Overrun {
    at: f64,
    method: &'static str,
    ns: &'static str,
    outcome: String,
    took: Duration,
    deadline: Duration,
}

impl Overrun {
    /// Seconds after (positive) or before (negative) the deadline.
    fn margin(&self) -> f64 {
        self.took.as_secs_f64() - self.deadline.as_secs_f64()
    }
}

impl std::fmt::Display for Overrun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:>7.3}s] {} {} → {} after {} ms (deadline {} ms, {:+.0} ms)",
            self.at,
            self.method,
            self.ns,
            self.outcome,
            self.took.as_millis(),
            self.deadline.as_millis(),
            self.margin() * 1000.0
        )
    }
}

/// Calls answered, and those failed with another code than NOT_FOUND,
/// over every worker (for the progress line).
static CALLS: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicU64 = AtomicU64::new(0);

/// How a worker's calls went.
#[derive(Default)]
struct Tally {
    /// (method, outcome) → calls.
    /// (method, namespace, outcome) → calls.
    outcomes: BTreeMap<(&'static str, &'static str, String), u64>,
    /// The call answered latest relative to its deadline.
    worst_margin: Option<Overrun>,
    /// The slowest answer, by method.
    slowest: BTreeMap<&'static str, Duration>,
    /// Calls answered after deadline + OVERRUN_BOUND (hung ones included).
    overruns: Vec<Overrun>,
    hung: u64,
    /// Get of an acknowledged key on Redis/PostgreSQL answered NOT_FOUND or
    /// another value, while the load ran.
    stale_reads: Vec<String>,
    /// Messages the subscribers received.
    messages: u64,
    /// How open Subscribe streams ended.
    stream_ends: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        for (k, n) in other.outcomes {
            *self.outcomes.entry(k).or_default() += n;
        }
        if let Some(w) = other.worst_margin {
            self.consider(w);
        }
        for (m, d) in other.slowest {
            let e = self.slowest.entry(m).or_default();
            *e = (*e).max(d);
        }
        self.overruns.extend(other.overruns);
        self.hung += other.hung;
        self.stale_reads.extend(other.stale_reads);
        self.messages += other.messages;
        for (k, n) in other.stream_ends {
            *self.stream_ends.entry(k).or_default() += n;
        }
    }

    /// Keeps `r` if it was answered later, relative to its deadline, than
    /// the latest so far.
    fn consider(&mut self, r: Overrun) {
        if self
            .worst_margin
            .as_ref()
            .is_none_or(|w| r.margin() > w.margin())
        {
            self.worst_margin = Some(r);
        }
    }

    /// Times `call` (which carries `deadline` as `grpc-timeout`), counts its
    /// outcome, and returns its answer.
    async fn call<T>(
        &mut self,
        method: &'static str,
        ns: &'static str,
        deadline: Duration,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, String> {
        let at = now();
        let started = Instant::now();
        let answer = tokio::time::timeout(deadline + GUARD, call).await;
        let took = started.elapsed();
        let (result, outcome) = match answer {
            Ok(Ok(v)) => (Ok(v), "OK".to_string()),
            Ok(Err(s)) => {
                let o = outcome_of(&s);
                (Err(o.clone()), o)
            }
            Err(_) => {
                self.hung += 1;
                (Err("HUNG".to_string()), "HUNG".to_string())
            }
        };
        CALLS.fetch_add(1, Ordering::Relaxed);
        if result.as_ref().is_err_and(|o| !o.starts_with("NOT_FOUND")) {
            FAILED.fetch_add(1, Ordering::Relaxed);
        }
        let slowest = self.slowest.entry(method).or_default();
        *slowest = (*slowest).max(took);
        let record = Overrun {
            at,
            method,
            ns,
            outcome: outcome.clone(),
            took,
            deadline,
        };
        if took > deadline + OVERRUN_BOUND {
            println!("  !! call past its deadline: {record}");
            self.overruns.push(record.clone());
        }
        self.consider(record);
        *self.outcomes.entry((method, ns, outcome)).or_default() += 1;
        result
    }
}

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(deadline);
    req
}

/// An acknowledged Put.
struct Acked {
    ns: &'static str,
    key: String,
    /// When it was sent.
    sent: SystemTime,
}

// --- the load ------------------------------------------------------------------

/// One key-value worker: the mix in the module docs until `stop`.
async fn kv_worker(
    addr: String,
    ns: &'static str,
    id: usize,
    mut rng: Rng,
    stop: watch::Receiver<bool>,
) -> (Tally, Vec<Acked>) {
    let mut kv = KeyValueClient::new(H2Channel::connect(&addr).await);
    let durable = ns != NS_MEM;
    let mut tally = Tally::default();
    let mut acked = Vec::new();
    let mut mine: Vec<String> = Vec::new();
    let mut scratch: Vec<String> = Vec::new();
    let (mut n, mut m) = (0u64, 0u64);
    while !*stop.borrow() {
        let op = rng.below(100);
        if op < 40 {
            n += 1;
            let key = format!("w{id}/{n:08}");
            let sent = SystemTime::now();
            let req = PutRequest {
                namespace: ns.into(),
                key: key.clone(),
                value: key.clone().into_bytes(),
                ttl: None,
            };
            let r = tally
                .call(
                    "Put",
                    ns,
                    UNARY_DEADLINE,
                    kv.put(with_deadline(req, UNARY_DEADLINE)),
                )
                .await;
            if r.is_ok() {
                mine.push(key.clone());
                acked.push(Acked { ns, key, sent });
            }
        } else if op < 50 {
            m += 1;
            let key = format!("t{id}/{m:08}");
            let req = PutRequest {
                namespace: ns.into(),
                key: key.clone(),
                value: b"scratch".to_vec(),
                ttl: None,
            };
            let r = tally
                .call(
                    "Put",
                    ns,
                    UNARY_DEADLINE,
                    kv.put(with_deadline(req, UNARY_DEADLINE)),
                )
                .await;
            if r.is_ok() {
                scratch.push(key);
            }
        } else if op < 60 {
            let key = scratch.pop().unwrap_or_else(|| format!("t{id}/none"));
            let req = DeleteRequest {
                namespace: ns.into(),
                key,
            };
            let _ = tally
                .call(
                    "Delete",
                    ns,
                    UNARY_DEADLINE,
                    kv.delete(with_deadline(req, UNARY_DEADLINE)),
                )
                .await;
        } else if op < 90 {
            let known = !mine.is_empty() && rng.below(2) == 0;
            let key = if known {
                mine[rng.below(mine.len() as u64) as usize].clone()
            } else {
                format!("missing/{}", rng.below(1 << 20))
            };
            let req = GetRequest {
                namespace: ns.into(),
                key: key.clone(),
            };
            let r = tally
                .call(
                    "Get",
                    ns,
                    UNARY_DEADLINE,
                    kv.get(with_deadline(req, UNARY_DEADLINE)),
                )
                .await;
            if known && durable {
                let stale = match &r {
                    Ok(res) if res.get_ref().value != key.as_bytes() => Some(format!(
                        "value {:?}",
                        String::from_utf8_lossy(&res.get_ref().value)
                    )),
                    Err(o) if o.starts_with("NOT_FOUND") => Some(o.clone()),
                    _ => None,
                };
                if let Some(what) = stale {
                    let line = format!("[{:>7.3}s] Get {ns} {key} (acknowledged) → {what}", now());
                    println!("  !! {line}");
                    tally.stale_reads.push(line);
                }
            }
        } else {
            let req = ListRequest {
                namespace: ns.into(),
                prefix: format!("w{id}/"),
                page_size: 10,
                page_token: String::new(),
            };
            let _ = tally
                .call(
                    "List",
                    ns,
                    UNARY_DEADLINE,
                    kv.list(with_deadline(req, UNARY_DEADLINE)),
                )
                .await;
        }
        tokio::time::sleep(PACE).await;
    }
    (tally, acked)
}

async fn publisher(addr: String, id: usize, stop: watch::Receiver<bool>) -> Tally {
    let mut pubsub = PubSubClient::new(H2Channel::connect(&addr).await);
    let mut tally = Tally::default();
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let req = PublishRequest {
            namespace: NS_EVENTS.into(),
            topic: TOPIC.into(),
            payload: format!("p{id}/{n}").into_bytes(),
            attributes: Default::default(),
        };
        let _ = tally
            .call(
                "Publish",
                NS_EVENTS,
                UNARY_DEADLINE,
                pubsub.publish(with_deadline(req, UNARY_DEADLINE)),
            )
            .await;
        tokio::time::sleep(PACE * 2).await;
    }
    tally
}

async fn subscriber(addr: String, mut stop: watch::Receiver<bool>) -> Tally {
    let mut pubsub = PubSubClient::new(H2Channel::connect(&addr).await);
    let mut tally = Tally::default();
    while !*stop.borrow() {
        let req = SubscribeRequest {
            namespace: NS_EVENTS.into(),
            topic: TOPIC.into(),
            queue_group: String::new(),
        };
        let opened = tally
            .call(
                "Subscribe",
                NS_EVENTS,
                SUBSCRIBE_DEADLINE,
                pubsub.subscribe(with_deadline(req, SUBSCRIBE_DEADLINE)),
            )
            .await;
        if let Ok(res) = opened {
            let mut stream = res.into_inner();
            let end = loop {
                tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(_)) => tally.messages += 1,
                        Ok(None) => break Some("ended OK".to_string()),
                        Err(s) => break Some(outcome_of(&s)),
                    },
                    _ = stop.wait_for(|s| *s) => break None,
                }
            };
            if let Some(end) = end {
                *tally.stream_ends.entry(end).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tally
}

// --- the chaos -------------------------------------------------------------------

/// The private backend servers.
struct Servers {
    redis: RedisServer,
    pg: PostgresServer,
    nats: NatsServer,
}

/// What the chaos task can kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Pattern(&'static str),
    Redis,
    Postgres,
    Nats,
}

impl Target {
    const ALL: [Target; 7] = [
        Target::Pattern("mem"),
        Target::Pattern("redis"),
        Target::Pattern("pg"),
        Target::Pattern("nats"),
        Target::Redis,
        Target::Postgres,
        Target::Nats,
    ];

    fn name(self) -> String {
        match self {
            Target::Pattern(p) => format!("pattern {p}"),
            Target::Redis => "Redis server".into(),
            Target::Postgres => "PostgreSQL server".into(),
            Target::Nats => "NATS server".into(),
        }
    }
}

#[derive(Default)]
struct ChaosLog {
    kills: BTreeMap<Target, u64>,
    skipped: u64,
    /// Pattern pids the chaos killed.
    killed_pids: BTreeSet<u32>,
}

/// Processes whose working directory is `dir` (a PostgreSQL cluster's
/// processes all work in its data directory).
fn processes_in(dir: &std::path::Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|c| c == dir)
            && !process_gone(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILL to the postmaster and then to every process of its cluster,
/// until none is left.
async fn kill_postgres(pg: &PostgresServer) -> u32 {
    let Some(pid) = pg.pid() else { return 0 };
    let data: Option<PathBuf> = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let mut killed = 1;
    let until = Instant::now() + Duration::from_secs(10);
    while let Some(dir) = &data {
        let left = processes_in(dir);
        if left.is_empty() || Instant::now() > until {
            break;
        }
        for p in left {
            if kill(Pid::from_raw(p as i32), Signal::SIGKILL).is_ok() {
                killed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killed
}

/// Every process of pattern `pattern` (its only one, or each replica).
async fn processes_of(
    admin: &mut admin::admin_client::AdminClient<tonic::transport::Channel>,
    pattern: &str,
) -> Vec<admin::Pattern> {
    admin
        .list_patterns(admin::ListPatternsRequest {})
        .await
        .map(|r| r.into_inner().patterns)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.pattern == pattern)
        .collect()
}

/// Kills something every 2–6 s until `stop`; a server it kills is always
/// back before it returns.
async fn chaos(
    admin_addr: String,
    mut servers: Servers,
    mut rng: Rng,
    mut stop: watch::Receiver<bool>,
) -> (Servers, ChaosLog) {
    let channel = tonic::transport::Endpoint::from_shared(admin_addr)
        .expect("uri")
        .connect()
        .await
        .expect("connect to the proxy's admin door");
    let mut admin = admin::admin_client::AdminClient::new(channel);
    let mut log = ChaosLog::default();
    loop {
        let pause = rng.ms(2000, 6000);
        if tokio::time::timeout(pause, stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            break;
        }
        let target = Target::ALL[rng.below(Target::ALL.len() as u64) as usize];
        let at = now();
        match target {
            Target::Pattern(name) => {
                let mut processes = processes_of(&mut admin, name).await;
                // One replica at random (the draw is made even for one
                // process, so a seed kills at the same times either way).
                let pick = rng.below(processes.len().max(1) as u64) as usize;
                let process = (pick < processes.len()).then(|| processes.swap_remove(pick));
                match process {
                    Some(p) if p.pid != 0 => {
                        let pid = p.pid;
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                        println!(
                            "[{at:>7.3}s] SIGKILL pattern {} (pid {pid}, was {})",
                            p.name,
                            p.state().as_str_name().trim_start_matches("PATTERN_STATE_")
                        );
                        log.killed_pids.insert(pid);
                        *log.kills.entry(target).or_default() += 1;
                    }
                    other => {
                        println!(
                            "[{at:>7.3}s] pattern {name} has no process to kill ({:?}); skipped",
                            other.map(|p| (p.name, p.state))
                        );
                        log.skipped += 1;
                    }
                }
            }
            Target::Redis | Target::Postgres | Target::Nats => {
                let down = rng.ms(500, 3000);
                let (pid, extra) = match target {
                    Target::Redis => {
                        let pid = servers.redis.pid().unwrap_or(0);
                        servers.redis.kill().await;
                        (pid, String::new())
                    }
                    Target::Postgres => {
                        let pid = servers.pg.pid().unwrap_or(0);
                        let n = kill_postgres(&servers.pg).await;
                        (
                            pid,
                            format!(" and the rest of its cluster, {n} processes in all"),
                        )
                    }
                    _ => {
                        let pid = servers.nats.pid().unwrap_or(0);
                        servers.nats.kill().await;
                        (pid, String::new())
                    }
                };
                println!(
                    "[{at:>7.3}s] SIGKILL {} (pid {pid}{extra}); back in {} ms",
                    target.name(),
                    down.as_millis()
                );
                *log.kills.entry(target).or_default() += 1;
                tokio::time::sleep(down).await;
                let t = Instant::now();
                match target {
                    Target::Redis => servers.redis.restart().await,
                    Target::Postgres => servers.pg.restart().await,
                    _ => servers.nats.restart().await,
                }
                println!(
                    "[{:>7.3}s] {} back (restart took {} ms)",
                    now(),
                    target.name(),
                    t.elapsed().as_millis()
                );
            }
        }
    }
    (servers, log)
}

/// Every pattern pid the proxy reports, and its children, every 100 ms.
async fn watch_pids(
    admin_addr: String,
    proxy_pid: u32,
    seen: Arc<Mutex<BTreeMap<u32, String>>>,
    mut stop: watch::Receiver<bool>,
) {
    let channel = tonic::transport::Endpoint::from_shared(admin_addr)
        .expect("uri")
        .connect_lazy();
    let mut admin = admin::admin_client::AdminClient::new(channel);
    loop {
        if let Ok(r) = admin.list_patterns(admin::ListPatternsRequest {}).await {
            let mut seen = seen.lock().unwrap();
            for p in r.into_inner().patterns {
                if p.pid != 0 {
                    seen.entry(p.pid).or_insert(p.name);
                }
            }
        }
        for kid in children_of(proxy_pid) {
            seen.lock()
                .unwrap()
                .entry(kid)
                .or_insert_with(|| "(child)".into());
        }
        if tokio::time::timeout(Duration::from_millis(100), stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
    }
}

// --- after the chaos ---------------------------------------------------------------

/// Waits until every pattern is SERVING; starts a FAILED one again (and
/// says so). Returns the problems left when [`RECOVERY`] ran out.
async fn recover(proxy: &Proxy) -> Vec<String> {
    let mut admin = proxy.admin().await;
    let until = Instant::now() + RECOVERY;
    let mut restarted = BTreeSet::new();
    loop {
        let mut waiting = Vec::new();
        for pattern in PATTERNS {
            let processes = processes_of(&mut admin, pattern).await;
            if processes.is_empty() {
                waiting.push(format!("{pattern}: no process listed"));
            }
            for p in processes {
                let name = p.name.clone();
                match p.state() {
                    PatternState::Serving => {}
                    PatternState::Failed if restarted.insert(name.clone()) => {
                        println!(
                            "[{:>7.3}s] pattern {name} is FAILED ({}); StartPattern",
                            now(),
                            p.last_error
                        );
                        let _ = admin
                            .start_pattern(admin::PatternActionRequest { name: name.clone() })
                            .await;
                        waiting.push(format!("{name} FAILED"));
                    }
                    s => waiting.push(format!(
                        "{name} {} ({})",
                        s.as_str_name().trim_start_matches("PATTERN_STATE_"),
                        p.last_error
                    )),
                }
            }
        }
        if waiting.is_empty() || Instant::now() > until {
            return waiting;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What reading back one namespace found.
#[derive(Default)]
struct Readback {
    acked: usize,
    /// Acknowledged writes checked (for memstore, only those sent after its
    /// current process started).
    checked: usize,
    /// Missing or with another value, through the proxy.
    lost: Vec<String>,
    /// Could not be read through the proxy (an error other than NOT_FOUND,
    /// after retries): counted as lost too.
    unreadable: usize,
    /// Missing or different in the backend itself (`None`: not checked).
    lost_direct: Option<usize>,
}

/// Reads `keys` back through the proxy, 16 at a time.
async fn read_through_proxy(addr: &str, ns: &'static str, keys: &[&str], r: &mut Readback) {
    let kv = KeyValueClient::new(H2Channel::connect(addr).await);
    let results: Vec<(String, Result<Vec<u8>, String>)> = futures::stream::iter(keys.iter())
        .map(|key| {
            let mut kv = kv.clone();
            let key = key.to_string();
            async move {
                let mut last = String::new();
                for _ in 0..10 {
                    let req = GetRequest {
                        namespace: ns.into(),
                        key: key.clone(),
                    };
                    let got = tokio::time::timeout(
                        Duration::from_secs(10),
                        kv.get(with_deadline(req, Duration::from_secs(5))),
                    )
                    .await;
                    match got {
                        Ok(Ok(v)) => return (key, Ok(v.into_inner().value)),
                        Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                            return (key, Err("NOT_FOUND".into()));
                        }
                        Ok(Err(s)) => last = outcome_of(&s),
                        Err(_) => last = "no answer in 10 s".into(),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                (key, Err(format!("unreadable: {last}")))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (key, got) in results {
        match got {
            Ok(v) if v == key.as_bytes() => {}
            Ok(v) => r.lost.push(format!(
                "{ns}/{key}: value {:?}",
                String::from_utf8_lossy(&v)
            )),
            Err(e) => {
                if e.starts_with("unreadable") {
                    r.unreadable += 1;
                }
                r.lost.push(format!("{ns}/{key}: {e}"));
            }
        }
    }
}

async fn redis_direct(url: &str, ns: &str, keys: &[&str]) -> usize {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the private Redis");
    let mut missing = 0;
    for chunk in keys.chunks(500) {
        let names: Vec<String> = chunk
            .iter()
            .map(|k| format!("{REDIS_PREFIX}{ns}:v:{k}"))
            .collect();
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(&mut conn)
            .await
            .expect("MGET from the private Redis");
        missing += chunk
            .iter()
            .zip(values)
            .filter(|(k, v)| v.as_deref() != Some(k.as_bytes()))
            .count();
    }
    missing
}

async fn postgres_direct(pg: &PostgresServer, ns: &str, keys: &[&str]) -> usize {
    let client = pg.connect().await;
    let rows = client
        .query(
            "SELECT key, value FROM trellis_kv WHERE namespace = $1",
            &[&ns],
        )
        .await
        .expect("read trellis_kv from the private PostgreSQL");
    let stored: HashMap<String, Vec<u8>> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
        .collect();
    keys.iter()
        .filter(|k| stored.get(**k).map(Vec::as_slice) != Some(k.as_bytes()))
        .count()
}

/// `GET /metrics` from the proxy's HTTP listener.
async fn scrape(http: &str) -> String {
    let addr = http.trim_start_matches("http://");
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: chaos\r\nconnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(s)) => s,
        _ => String::new(),
    }
}

// --- main ------------------------------------------------------------------------

fn count_line(label: &str, items: impl IntoIterator<Item = (String, u64)>) {
    let parts: Vec<String> = items.into_iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  {label:<26} {}",
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(", ")
        }
    );
}

#[tokio::main]
async fn main() {
    let pass = run().await;
    if !pass {
        std::process::exit(1);
    }
}

async fn run() -> bool {
    let secs = env_u64("CHAOS_SECS").unwrap_or(DEFAULT_SECS);
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "chaos: {secs} s of mixed load with random SIGKILLs, seed {seed} \
         (CHAOS_SEED={seed} to replay), {cores} cores, binaries from {}",
        target_dir().display()
    );
    let rng = Rng(seed);

    let servers = Servers {
        redis: RedisServer::start().await,
        pg: PostgresServer::start().await,
        nats: NatsServer::start().await,
    };
    let redis_url = servers.redis.url();
    let redis_replicas = env_u64("CHAOS_REDIS_REPLICAS").unwrap_or(1);
    let mut proxy = Proxy::builder()
        .log_level("info")
        .top(POLICY)
        .memstore("mem", &[NS_MEM])
        .with(RESTART)
        .pattern(redis_pattern(
            "redis",
            &[NS_REDIS],
            &redis_url,
            &format!("key_prefix: {REDIS_PREFIX:?}"),
        ))
        .with(RESTART)
        .with(&format!("replicas: {redis_replicas}"))
        .pattern(postgres_pattern("pg", &[NS_PG], &servers.pg.url(), ""))
        .with(RESTART)
        .pattern(nats_pattern("nats", &[NS_EVENTS], &servers.nats.url()))
        .with(RESTART)
        .policy(NS_MEM, "chaos")
        .policy(NS_REDIS, "chaos")
        .policy(NS_PG, "chaos")
        .policy(NS_EVENTS, "chaos")
        .start()
        .await;
    println!(
        "  proxy pid {} at {}; Redis :{} (pattern redis: {redis_replicas} replica{}), \
         PostgreSQL :{}, NATS :{}",
        proxy.pid(),
        proxy.addr,
        servers.redis.port(),
        if redis_replicas == 1 { "" } else { "s" },
        servers.pg.port(),
        servers.nats.port()
    );
    println!(
        "  load: {KV_WORKERS} workers on each of {NS_MEM}, {NS_REDIS}, {NS_PG} (Put 40 %, scratch \
         Put 10 %, Delete 10 %, Get 30 %, List 10 %), {PUBLISHERS} publishers and {SUBSCRIBERS} \
         subscribers on {NS_EVENTS}; one call per worker every {} ms at most; deadlines {} ms \
         (Subscribe {} ms to open)\n",
        PACE.as_millis(),
        UNARY_DEADLINE.as_millis(),
        SUBSCRIBE_DEADLINE.as_millis()
    );

    let addr = proxy.addr.trim_start_matches("http://").to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let seen: Arc<Mutex<BTreeMap<u32, String>>> = Arc::default();
    let (watcher_stop_tx, watcher_stop_rx) = watch::channel(false);
    let admin_addr = proxy.admin.clone().expect("the admin door is on");
    let watcher = tokio::spawn(watch_pids(
        admin_addr.clone(),
        proxy.pid(),
        seen.clone(),
        watcher_stop_rx,
    ));

    now();
    let load_started = Instant::now();
    let mut kv_workers = Vec::new();
    for (i, (ns, _)) in KV.iter().enumerate() {
        for w in 0..KV_WORKERS {
            let id = i * KV_WORKERS + w;
            kv_workers.push(tokio::spawn(kv_worker(
                addr.clone(),
                ns,
                id,
                rng.fork(id as u64 + 1),
                stop_rx.clone(),
            )));
        }
    }
    let mut others = Vec::new();
    for p in 0..PUBLISHERS {
        others.push(tokio::spawn(publisher(addr.clone(), p, stop_rx.clone())));
    }
    for _ in 0..SUBSCRIBERS {
        others.push(tokio::spawn(subscriber(addr.clone(), stop_rx.clone())));
    }
    let (chaos_stop_tx, chaos_stop_rx) = watch::channel(false);
    let chaos_task = tokio::spawn(chaos(
        admin_addr.clone(),
        servers,
        rng.fork(0),
        chaos_stop_rx,
    ));

    // Progress every 10 s, until the time is up.
    let end = load_started + Duration::from_secs(secs);
    let mut last = (0, 0);
    while Instant::now() < end {
        tokio::time::sleep((end - Instant::now()).min(Duration::from_secs(10))).await;
        let (c, f) = (
            CALLS.load(Ordering::Relaxed),
            FAILED.load(Ordering::Relaxed),
        );
        println!(
            "[{:>7.3}s] {} calls so far ({} in the last interval, {} of them failed, \
             NOT_FOUND aside)",
            now(),
            c,
            c - last.0,
            f - last.1
        );
        last = (c, f);
    }
    // The chaos first (a server it took down comes back), then the load.
    let _ = chaos_stop_tx.send(true);
    let (servers, chaos_log) = chaos_task.await.expect("chaos task");
    let _ = stop_tx.send(true);
    let mut tally = Tally::default();
    let mut acked: Vec<Acked> = Vec::new();
    for w in kv_workers {
        let (t, a) = w.await.expect("kv worker");
        tally.add(t);
        acked.extend(a);
    }
    for w in others {
        tally.add(w.await.expect("pubsub worker"));
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    println!(
        "[{:>7.3}s] load stopped; waiting for every pattern to be SERVING",
        now()
    );

    // Recovery.
    let recovery_started = Instant::now();
    let not_serving = recover(&proxy).await;
    let recovery_secs = recovery_started.elapsed().as_secs_f64();
    println!(
        "[{:>7.3}s] recovery: {}",
        now(),
        if not_serving.is_empty() {
            format!("every pattern SERVING after {recovery_secs:.1} s")
        } else {
            format!("NOT all SERVING after {recovery_secs:.1} s: {not_serving:?}")
        }
    );

    let readback = read_back(&proxy, &addr, &acked, &servers).await;
    let metrics = match proxy.http.as_deref() {
        Some(h) => scrape(h).await,
        None => String::new(),
    };
    let final_patterns = proxy
        .admin()
        .await
        .list_patterns(admin::ListPatternsRequest {})
        .await
        .map(|r| r.into_inner().patterns)
        .unwrap_or_default();

    // Every pattern pid ever seen, then SIGTERM.
    let _ = watcher_stop_tx.send(true);
    let _ = watcher.await;
    let mut seen = seen.lock().unwrap().clone();
    for kid in proxy.children() {
        seen.entry(kid).or_insert_with(|| "(child)".into());
    }
    for p in &final_patterns {
        if p.pid != 0 {
            seen.entry(p.pid).or_insert_with(|| p.name.clone());
        }
    }
    for pid in &chaos_log.killed_pids {
        seen.entry(*pid).or_insert_with(|| "(killed)".into());
    }
    let shutdown = shutdown(&mut proxy, seen).await;
    let logs = LogScan::of(&proxy.logs.lock().unwrap());
    drop(servers);

    Report {
        seed,
        load_secs,
        recovery_secs,
        not_serving,
        tally,
        chaos: chaos_log,
        final_patterns,
        readback,
        metrics,
        shutdown,
        logs,
    }
    .print()
}

/// Reads back every acknowledged Put of the key-value namespaces (for
/// memstore, only those sent after its current process started).
async fn read_back(
    proxy: &Proxy,
    addr: &str,
    acked: &[Acked],
    servers: &Servers,
) -> BTreeMap<&'static str, Readback> {
    let mut admin = proxy.admin().await;
    let mut readback = BTreeMap::new();
    for (ns, pattern) in KV {
        let mine: Vec<&Acked> = acked.iter().filter(|a| a.ns == ns).collect();
        let mut r = Readback {
            acked: mine.len(),
            ..Readback::default()
        };
        let checked: Vec<&str> = if ns == NS_MEM {
            // Only what the current process can have seen.
            let started = admin
                .get_pattern(admin::GetPatternRequest {
                    name: pattern.into(),
                })
                .await
                .ok()
                .and_then(|p| p.into_inner().start_time)
                .and_then(|t| SystemTime::try_from(t).ok());
            match started {
                Some(s) => mine
                    .iter()
                    .filter(|a| a.sent > s)
                    .map(|a| a.key.as_str())
                    .collect(),
                None => Vec::new(),
            }
        } else {
            mine.iter().map(|a| a.key.as_str()).collect()
        };
        r.checked = checked.len();
        read_through_proxy(addr, ns, &checked, &mut r).await;
        if ns == NS_REDIS {
            r.lost_direct = Some(redis_direct(&servers.redis.url(), ns, &checked).await);
        } else if ns == NS_PG {
            r.lost_direct = Some(postgres_direct(&servers.pg, ns, &checked).await);
        }
        println!(
            "[{:>7.3}s] read back {ns}: {} of {} acknowledged writes checked, {} lost{}",
            now(),
            r.checked,
            r.acked,
            r.lost.len(),
            r.lost_direct.map_or(String::new(), |n| format!(
                " ({n} missing in the backend itself)"
            ))
        );
        for l in r.lost.iter().take(10) {
            println!("  !! lost: {l}");
        }
        readback.insert(ns, r);
    }
    readback
}

/// How the proxy ended, and which of the pattern processes outlived it.
struct Shutdown {
    exit: String,
    exited_ok: bool,
    /// Every pattern pid seen during the run.
    seen: BTreeMap<u32, String>,
    /// Still running the moment the proxy had exited…
    alive_at_exit: usize,
    /// …and 2 s later: orphans.
    orphans: Vec<(u32, String)>,
}

/// SIGTERM to the proxy; waits (30 s at most) for it to exit, then for
/// every pid in `seen` to be gone.
async fn shutdown(proxy: &mut Proxy, seen: BTreeMap<u32, String>) -> Shutdown {
    let _ = kill(Pid::from_raw(proxy.pid() as i32), Signal::SIGTERM);
    let sigterm = Instant::now();
    let exit = tokio::time::timeout(Duration::from_secs(30), proxy.child.wait()).await;
    let desc = match &exit {
        Ok(Ok(s)) => format!(
            "exited {s} {} ms after SIGTERM",
            sigterm.elapsed().as_millis()
        ),
        Ok(Err(e)) => format!("wait failed: {e}"),
        Err(_) => {
            let _ = proxy.child.kill().await;
            "did NOT exit within 30 s of SIGTERM (killed)".into()
        }
    };
    println!("[{:>7.3}s] proxy {desc}", now());
    let mut orphans: Vec<(u32, String)> = seen
        .iter()
        .filter(|(pid, _)| !process_gone(**pid))
        .map(|(p, n)| (*p, n.clone()))
        .collect();
    let alive_at_exit = orphans.len();
    // A pattern reaped a moment after the proxy: give them 2 s to go.
    let gone_by = Instant::now() + Duration::from_secs(2);
    while !orphans.is_empty() && Instant::now() < gone_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
        orphans.retain(|(pid, _)| !process_gone(*pid));
    }
    // The log reader has the last lines once the proxy's final line is in.
    let logged_by = Instant::now() + Duration::from_secs(5);
    while !proxy.log_text().contains("\"stopped\"") && Instant::now() < logged_by {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Shutdown {
        exited_ok: matches!(&exit, Ok(Ok(s)) if s.success()),
        exit: desc,
        seen,
        alive_at_exit,
        orphans,
    }
}

/// What the proxy's log (its stderr, JSON lines) holds.
#[derive(Default)]
struct LogScan {
    /// Lines with `panicked` from the proxy itself…
    proxy_panics: Vec<String>,
    /// …and from a pattern's stderr, which the proxy re-emits.
    pattern_panics: Vec<String>,
    levels: BTreeMap<String, u64>,
    /// ERROR lines by message.
    errors: BTreeMap<String, u64>,
}

impl LogScan {
    fn of(lines: &[String]) -> LogScan {
        let mut scan = LogScan::default();
        for line in lines {
            let v: Option<serde_json::Value> = serde_json::from_str(line).ok();
            let from_pattern = v
                .as_ref()
                .and_then(|v| v.pointer("/fields/stream"))
                .and_then(|s| s.as_str())
                == Some("stderr");
            if line.contains("panicked") {
                if from_pattern {
                    scan.pattern_panics.push(line.clone());
                } else {
                    scan.proxy_panics.push(line.clone());
                }
            }
            let Some(v) = &v else {
                *scan.levels.entry("not JSON".into()).or_default() += 1;
                continue;
            };
            let level = v.get("level").and_then(|l| l.as_str()).unwrap_or("?");
            *scan.levels.entry(level.to_string()).or_default() += 1;
            if level == "ERROR" {
                let msg = v
                    .pointer("/fields/message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
                    .chars()
                    .take(120)
                    .collect::<String>();
                *scan.errors.entry(msg).or_default() += 1;
            }
        }
        scan
    }
}

/// Everything the summary prints.
struct Report {
    seed: u64,
    load_secs: f64,
    recovery_secs: f64,
    /// Patterns not SERVING when the recovery gave up.
    not_serving: Vec<String>,
    tally: Tally,
    chaos: ChaosLog,
    final_patterns: Vec<admin::Pattern>,
    readback: BTreeMap<&'static str, Readback>,
    /// The proxy's `/metrics` at the end.
    metrics: String,
    shutdown: Shutdown,
    logs: LogScan,
}

impl Report {
    /// Prints the summary and the verdict; true on PASS.
    fn print(&self) -> bool {
        let Report {
            seed,
            load_secs,
            recovery_secs,
            not_serving,
            tally,
            chaos: chaos_log,
            final_patterns,
            readback,
            metrics,
            shutdown,
            logs,
        } = self;
        let Shutdown {
            exit: exit_desc,
            exited_ok,
            seen,
            alive_at_exit,
            orphans,
        } = shutdown;
        let LogScan {
            proxy_panics,
            pattern_panics,
            levels,
            errors,
        } = logs;
        println!("\n== chaos summary (seed {seed}) ==");
        println!(
            "  {:<26} {load_secs:.1} s of load, {recovery_secs:.1} s to recover",
            "duration"
        );
        let mut by_method: BTreeMap<&str, u64> = BTreeMap::new();
        let mut by_ns: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        let mut by_method_outcome: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_reason: BTreeMap<String, u64> =
            REASONS.iter().map(|r| (r.to_string(), 0)).collect();
        for ((method, ns, outcome), n) in &tally.outcomes {
            *by_method.entry(method).or_default() += n;
            *by_ns.entry(ns).or_default().entry(outcome).or_default() += n;
            *by_method_outcome
                .entry(method)
                .or_default()
                .entry(outcome)
                .or_default() += n;
            let (code, reason) = outcome.split_once('/').unwrap_or((outcome, ""));
            *by_code.entry(code.to_string()).or_default() += n;
            if !reason.is_empty() {
                *by_reason.entry(reason.to_string()).or_default() += n;
            }
        }
        let total: u64 = by_method.values().sum();
        count_line(
            "calls by method",
            std::iter::once(("total".to_string(), total))
                .chain(by_method.iter().map(|(k, n)| (k.to_string(), *n))),
        );
        count_line("outcomes by code", by_code.clone());
        count_line("outcomes by reason", by_reason.clone());
        println!("  outcomes by method:");
        for (method, outcomes) in &by_method_outcome {
            let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
            println!("    {method:<10} {}", parts.join(", "));
        }
        println!("  outcomes by namespace:");
        for (ns, outcomes) in &by_ns {
            let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
            println!("    {ns:<10} {}", parts.join(", "));
        }
        count_line(
            "subscriptions",
            [("messages received".to_string(), tally.messages)]
                .into_iter()
                .chain(
                    tally
                        .stream_ends
                        .iter()
                        .map(|(k, n)| (format!("streams ended {k}"), *n)),
                ),
        );
        count_line(
            "kills",
            chaos_log
                .kills
                .iter()
                .map(|(t, n)| (t.name(), *n))
                .chain(std::iter::once(("skipped".to_string(), chaos_log.skipped))),
        );
        let restarts: Vec<(String, u64)> = final_patterns
            .iter()
            .map(|p| (format!("{} (pid {})", p.name, p.pid), u64::from(p.restarts)))
            .collect();
        count_line("pattern restarts", restarts);
        let acked_line: Vec<(String, u64)> = readback
            .iter()
            .map(|(ns, r)| (ns.to_string(), r.acked as u64))
            .collect();
        count_line("acknowledged writes", acked_line);
        let mut lost_total = 0;
        for (i, (ns, r)) in readback.iter().enumerate() {
            lost_total += r.lost.len() + r.lost_direct.unwrap_or(0);
            println!(
                "  {:<26} {}: {} lost of {} checked{}{}{}",
                if i == 0 { "lost writes" } else { "" },
                ns,
                r.lost.len(),
                r.checked,
                if *ns == NS_MEM {
                    " (memstore: only writes sent after its current process started)"
                } else {
                    ""
                },
                if r.unreadable > 0 {
                    format!(", {} of them unreadable", r.unreadable)
                } else {
                    String::new()
                },
                r.lost_direct.map_or(String::new(), |n| format!(
                    "; {n} missing in the backend itself"
                )),
            );
        }
        println!(
            "  {:<26} {} (during the load; Get of an acknowledged key on Redis/PostgreSQL)",
            "stale reads",
            tally.stale_reads.len()
        );
        let worst = tally
            .worst_margin
            .as_ref()
            .map_or("-".into(), |w| w.to_string());
        println!(
            "  {:<26} {} (hung: {})",
            format!("past deadline + {} ms", OVERRUN_BOUND.as_millis()),
            tally.overruns.len(),
            tally.hung
        );
        println!("  {:<26} {worst}", "latest vs its deadline");
        count_line(
            "slowest answer (ms)",
            tally
                .slowest
                .iter()
                .map(|(m, d)| (m.to_string(), d.as_millis() as u64)),
        );
        for o in tally.overruns.iter().take(20) {
            println!("    {o}");
        }
        println!(
            "  {:<26} {} of {} pattern pids seen ({} alive right at the proxy's exit)",
            "orphans",
            orphans.len(),
            seen.len(),
            alive_at_exit
        );
        for (pid, name) in orphans {
            println!("    pid {pid} ({name}) still running");
        }
        println!(
            "  {:<26} {} in the proxy, {} in patterns' stderr",
            "panics",
            proxy_panics.len(),
            pattern_panics.len()
        );
        for l in proxy_panics.iter().chain(pattern_panics).take(10) {
            println!("    {l}");
        }
        count_line(
            "proxy log lines by level",
            levels.iter().map(|(k, n)| (k.clone(), *n)),
        );
        for (msg, n) in errors.iter().take(10) {
            println!("    ERROR ×{n}: {msg}");
        }
        println!("  proxy {exit_desc}");
        let interesting = [
            "trellis_policy_refusals_total",
            "trellis_circuit_trips_total",
            "trellis_retries_total",
            "trellis_retry_budget_exhausted_total",
        ];
        let metric_lines: Vec<&str> = metrics
            .lines()
            .filter(|l| interesting.iter().any(|m| l.starts_with(m)))
            .filter(|l| !l.ends_with(" 0"))
            .collect();
        println!("  from the proxy's /metrics (non-zero policy counters):");
        for l in &metric_lines {
            println!("    {l}");
        }
        if metric_lines.is_empty() {
            println!("    (none)");
        }
        let metric_sum = |name: &str, label: &str| -> u64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name) && l.contains(label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        for reason in [
            "CIRCUIT_OPEN",
            "CONCURRENCY_LIMIT",
            "RATE_LIMITED",
            "PROXY_OVERLOADED",
        ] {
            let (client, proxy_says) = (
                by_reason.get(reason).copied().unwrap_or(0),
                metric_sum(
                    "trellis_policy_refusals_total",
                    &format!("reason=\"{reason}\""),
                ),
            );
            if client != proxy_says {
                println!(
                    "    note: the clients saw {client} {reason}, the proxy counted {proxy_says}"
                );
            }
        }

        let mut checks = vec![
            (
                lost_total == 0,
                format!("{lost_total} acknowledged writes lost"),
            ),
            (
                tally.overruns.is_empty(),
                format!(
                    "{} calls answered more than {} ms past their deadline ({} hung)",
                    tally.overruns.len(),
                    OVERRUN_BOUND.as_millis(),
                    tally.hung
                ),
            ),
            (
                orphans.is_empty(),
                format!("{} orphan processes", orphans.len()),
            ),
            (
                proxy_panics.is_empty(),
                format!("{} proxy panics", proxy_panics.len()),
            ),
        ];
        // Preconditions of the figures above: without them they prove less.
        checks.push((
            not_serving.is_empty(),
            format!("every pattern SERVING again after the chaos ({not_serving:?})"),
        ));
        checks.push((*exited_ok, format!("proxy {exit_desc}")));
        println!();
        for (ok, what) in &checks {
            println!("  {} {what}", if *ok { "ok  " } else { "FAIL" });
        }
        if !tally.stale_reads.is_empty() || !pattern_panics.is_empty() {
            println!(
                "  note: {} stale reads and {} pattern panics (reported, not judged)",
                tally.stale_reads.len(),
                pattern_panics.len()
            );
        }
        let pass = checks.iter().all(|(ok, _)| *ok);
        println!(
            "\n{} — {total} calls in {load_secs:.0} s, {} kills, seed {seed}",
            if pass { "PASS" } else { "FAIL" },
            chaos_log.kills.values().sum::<u64>()
        );
        pass
    }
}
