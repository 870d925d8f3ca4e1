//! `make bench-backends`: what the proxy and a backend pattern cost over
//! talking to the backend directly, measured in one run against the same
//! private server:
//!
//! 1. throughput: `CLIENTS` clients, each with its own connection and one
//!    request in flight (no pipelining), 50% Get / 50% Put over 1,000 keys
//!    of 100 bytes, for `PHASE` — directly (redis crate / tokio-postgres) and
//!    through proxy → pattern;
//! 2. latency at a fixed, moderate rate (`RATE` requests/s, open loop: each
//!    request starts on schedule whatever the others do), p50 and p99 both
//!    ways; the difference is what the proxy path adds.
//!
//! Redis runs without persistence and PostgreSQL with
//! `synchronous_commit = off`, so the figures show the request path rather
//! than the disk. "Directly" runs the equivalent commands: for Redis plain
//! GET / SET (the pattern's Put also updates the namespace's List index in
//! one Lua script); for PostgreSQL the same SELECT and upsert as the pattern.
//! Client, proxy, pattern and server share this machine's cores, so the
//! absolute figures depend on it; the ratios travel better. Every phase is
//! bounded in time; the run takes under a minute.
//!
//! Run with release binaries: `cargo build --release --workspace --bins &&
//! cargo bench -p trellis-tests --bench backends`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tonic::transport::Channel;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_tests::Proxy;
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};

const CLIENTS: usize = 16;
const KEYS: usize = 1000;
const VALUE: [u8; 100] = [b'v'; 100];
const PHASE: Duration = Duration::from_secs(3);
const RATE: u64 = 2000;
const NS: &str = "bench";

type BoxFut<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One client connection that can do a Get or a Put of key `i`.
trait Client: Send + 'static {
    fn op(&mut self, put: bool, key: usize) -> BoxFut<'_>;
}

fn key(i: usize) -> String {
    format!("key/{i:04}")
}

/// A cheap deterministic sequence of (put?, key) choices.
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> (bool, usize) {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 & 1 == 0, ((self.0 >> 1) % KEYS as u64) as usize)
    }
}

// Clients --------------------------------------------------------------------

struct Grpc(KeyValueClient<Channel>);

impl Client for Grpc {
    fn op(&mut self, put: bool, key_index: usize) -> BoxFut<'_> {
        Box::pin(async move {
            if put {
                self.0
                    .put(PutRequest {
                        namespace: NS.into(),
                        key: key(key_index),
                        value: VALUE.to_vec(),
                        ttl: None,
                    })
                    .await
                    .map(|_| ())
            } else {
                self.0
                    .get(GetRequest {
                        namespace: NS.into(),
                        key: key(key_index),
                    })
                    .await
                    .map(|_| ())
            }
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        })
    }
}

async fn grpc_clients(proxy: &Proxy) -> Vec<Grpc> {
    let mut v = Vec::new();
    for _ in 0..CLIENTS {
        // A channel each: its own HTTP/2 connection, like separate clients.
        let channel = tonic::transport::Endpoint::from_shared(proxy.addr.clone())
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the proxy");
        v.push(Grpc(KeyValueClient::new(channel)));
    }
    v
}

struct RedisDirect(redis::aio::MultiplexedConnection, String);

impl Client for RedisDirect {
    fn op(&mut self, put: bool, key_index: usize) -> BoxFut<'_> {
        Box::pin(async move {
            let k = format!("{}{}", self.1, key(key_index));
            if put {
                redis::cmd("SET")
                    .arg(k)
                    .arg(&VALUE[..])
                    .query_async::<()>(&mut self.0)
                    .await
            } else {
                redis::cmd("GET")
                    .arg(k)
                    .query_async::<Option<Vec<u8>>>(&mut self.0)
                    .await
                    .map(|_| ())
            }
            .map_err(|e| e.to_string())
        })
    }
}

async fn redis_clients(url: &str) -> Vec<RedisDirect> {
    let client = redis::Client::open(url).expect("redis url");
    let mut v = Vec::new();
    for _ in 0..CLIENTS {
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        v.push(RedisDirect(conn, "direct:".into()));
    }
    v
}

struct PgDirect {
    client: tokio_postgres::Client,
    get: tokio_postgres::Statement,
    put: tokio_postgres::Statement,
}

impl Client for PgDirect {
    fn op(&mut self, put: bool, key_index: usize) -> BoxFut<'_> {
        Box::pin(async move {
            let k = key(key_index);
            let none: Option<i64> = None;
            if put {
                self.client
                    .execute(&self.put, &[&"direct", &k, &&VALUE[..], &none])
                    .await
                    .map(|_| ())
            } else {
                self.client
                    .query_opt(&self.get, &[&"direct", &k])
                    .await
                    .map(|_| ())
            }
            .map_err(|e| e.to_string())
        })
    }
}

async fn pg_clients(pg: &PostgresServer) -> Vec<PgDirect> {
    let mut v = Vec::new();
    for _ in 0..CLIENTS {
        let client = pg.connect().await;
        // The pattern's statements (patterns/postgres/src/schema.rs).
        let get = client
            .prepare(
                "SELECT value FROM trellis_kv WHERE namespace = $1 AND key = $2 \
                 AND (expires_at IS NULL OR expires_at > now())",
            )
            .await
            .expect("prepare get");
        let put = client
            .prepare(
                "INSERT INTO trellis_kv (namespace, key, value, expires_at) \
                 VALUES ($1, $2, $3, now() + $4::bigint * interval '1 microsecond') \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
            )
            .await
            .expect("prepare put");
        v.push(PgDirect { client, get, put });
    }
    v
}

// Measurements -------------------------------------------------------------

/// Writes every key once, so Gets find values.
async fn fill<C: Client>(clients: &mut [C]) {
    let c = &mut clients[0];
    for i in 0..KEYS {
        c.op(true, i).await.expect("fill");
    }
}

/// Closed loop: every client sends its next request as soon as the last
/// one answered, for `PHASE`. Returns requests per second.
async fn throughput<C: Client>(clients: Vec<C>) -> (f64, Vec<C>) {
    let start = Instant::now();
    let deadline = start + PHASE;
    let mut tasks = Vec::new();
    for (n, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut choices = Choices(0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1));
            let mut done = 0u64;
            while Instant::now() < deadline {
                let (put, k) = choices.next();
                c.op(put, k)
                    .await
                    .expect("request during the throughput phase");
                done += 1;
            }
            (done, c)
        }));
    }
    let mut total = 0;
    let mut back = Vec::new();
    for t in tasks {
        let (done, c) = t.await.expect("client task");
        total += done;
        back.push(c);
    }
    (total as f64 / start.elapsed().as_secs_f64(), back)
}

/// Open loop at `RATE` requests/s for `PHASE`: each request is sent on
/// schedule (on the next connection in turn) whatever the others do; its
/// latency runs from when it was sent — timer wake-up lateness excluded,
/// waiting for a busy connection included. Returns (p50, p99, how many).
async fn latency<C: Client>(clients: Vec<C>) -> (Duration, Duration, usize) {
    let pool: Vec<Arc<Mutex<C>>> = clients
        .into_iter()
        .map(|c| Arc::new(Mutex::new(c)))
        .collect();
    let total = (RATE * PHASE.as_secs()) as usize;
    let gap = Duration::from_nanos(1_000_000_000 / RATE);
    let start = tokio::time::Instant::now();
    let mut choices = Choices(0x2545_F491_4F6C_DD1D);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let at = start + gap * i as u32;
        tokio::time::sleep_until(at).await;
        let sent = Instant::now();
        let (put, k) = choices.next();
        let slot = Arc::clone(&pool[i % pool.len()]);
        tasks.push(tokio::spawn(async move {
            let mut c = slot.lock().await;
            c.op(put, k)
                .await
                .expect("request during the latency phase");
            sent.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.push(t.await.expect("request task"));
    }
    lat.sort();
    let pick = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.99), lat.len())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Figures {
    direct_rps: f64,
    proxy_rps: f64,
    direct: (Duration, Duration, usize),
    proxied: (Duration, Duration, usize),
}

fn report(backend: &str, f: &Figures) {
    println!("{backend}");
    println!(
        "  throughput, {CLIENTS} clients, 1 in flight each   direct {:>9.0} req/s   via proxy {:>9.0} req/s   proxy/direct {:>5.2}",
        f.direct_rps,
        f.proxy_rps,
        f.proxy_rps / f.direct_rps
    );
    println!(
        "  latency at {RATE} req/s (n={:>5})            direct p50 {:>6.3} ms  p99 {:>6.3} ms",
        f.direct.2,
        ms(f.direct.0),
        ms(f.direct.1)
    );
    println!(
        "                                             via proxy p50 {:>6.3} ms  p99 {:>6.3} ms",
        ms(f.proxied.0),
        ms(f.proxied.1)
    );
    println!(
        "  added by proxy + pattern                   p50 {:>+7.3} ms   p99 {:>+7.3} ms",
        ms(f.proxied.0) - ms(f.direct.0),
        ms(f.proxied.1) - ms(f.direct.1)
    );
}

async fn measure<D: Client, P: Client>(mut direct: Vec<D>, mut proxied: Vec<P>) -> Figures {
    fill(&mut direct).await;
    fill(&mut proxied).await;
    let (direct_rps, direct) = throughput(direct).await;
    let (proxy_rps, proxied) = throughput(proxied).await;
    let direct = latency(direct).await;
    let proxied = latency(proxied).await;
    Figures {
        direct_rps,
        proxy_rps,
        direct,
        proxied,
    }
}

#[tokio::main]
async fn main() {
    println!(
        "backends: direct vs client → trellis → pattern → server; {CLIENTS} clients, 50% Get / \
         50% Put, {KEYS} keys of {} bytes, {PHASE:?} per phase\n",
        VALUE.len()
    );

    // Reference: the proxy path alone, to an in-memory pattern (no backend).
    let proxy = Proxy::builder()
        .log_level("warn")
        .memstore("memstore", &[NS])
        .start()
        .await;
    let mut clients = grpc_clients(&proxy).await;
    fill(&mut clients).await;
    let (rps, clients) = throughput(clients).await;
    let (p50, p99, n) = latency(clients).await;
    println!("reference: proxy → memstore (no backend server)");
    println!(
        "  throughput {rps:>9.0} req/s; at {RATE} req/s (n={n}) p50 {:.3} ms  p99 {:.3} ms\n",
        ms(p50),
        ms(p99)
    );
    drop(proxy);

    let redis = RedisServer::start_in_memory().await;
    let proxy = Proxy::builder()
        .log_level("warn")
        .pattern(redis_pattern("redis", &[NS], &redis.url(), ""))
        .start()
        .await;
    let figures = measure(
        redis_clients(&redis.url()).await,
        grpc_clients(&proxy).await,
    )
    .await;
    report(
        "Redis (no persistence; direct = GET/SET, the pattern's Put also keeps the List index)",
        &figures,
    );
    drop(proxy);
    drop(redis);
    println!();

    let pg = PostgresServer::start_with(&[("synchronous_commit", "off")]).await;
    let proxy = Proxy::builder()
        .log_level("warn")
        .pattern(postgres_pattern(
            "postgres",
            &[NS],
            &pg.url(),
            &format!("pool:\n  max_size: {CLIENTS}"),
        ))
        .start()
        .await;
    // The pattern created the table; the direct clients use it too.
    let figures = measure(pg_clients(&pg).await, grpc_clients(&proxy).await).await;
    report(
        "PostgreSQL (synchronous_commit off; direct = the pattern's SELECT and upsert)",
        &figures,
    );
}
