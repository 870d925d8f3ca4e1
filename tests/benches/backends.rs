//! `make bench-backends`: what the proxy and a backend pattern cost over
//! talking to the backend directly, measured in one run against the same
//! private server. Each section measures these paths, in this order:
//!
//! - client → server directly (redis crate / tokio-postgres);
//! - client → pattern, over gRPC to the pattern's own endpoint: the pattern's
//!   share of the cost;
//! - client → bare forwarder → pattern → server: the least a gRPC proxy on
//!   the same stack (tonic, hyper, h2, tokio) costs — see `forwarder`;
//! - client → trellis → pattern → server;
//! - the same with a new idempotency key on every Put (the pattern records
//!   each atomically with its write: docs/idempotency.md), and the ratio.
//!
//! The proxies inherit the environment, so `TRELLIS_WORKER_THREADS=1 make
//! bench-backends` measures a single-threaded proxy.
//!
//! A reference section does the same with memstore, which has no backend:
//! its "client → memstore" line is the cost of one gRPC hop on this machine.
//!
//! For each path:
//! 1. throughput: `CLIENTS` clients, each with its own connection and one
//!    request in flight (no pipelining), 50% Get / 50% Put over 1,000 keys
//!    of 100 bytes, for `PHASE`;
//! 2. latency at a fixed, moderate rate (`RATE` requests/s, open loop: each
//!    request starts on schedule whatever the others do), p50 and p99. The
//!    differences from the first line are what each extra hop adds.
//!
//! Redis runs without persistence and PostgreSQL with
//! `synchronous_commit = off`, so the figures show the request path rather
//! than the disk. "Directly" runs the equivalent commands: for Redis plain
//! GET / SET (the pattern's Put also updates the namespace's List index in
//! one Lua script); for PostgreSQL the same SELECT and upsert as the pattern.
//! The load generator runs on a current-thread runtime, which adds less of
//! its own latency than a multi-thread one. Client, proxy, pattern and
//! server share this machine's cores, so the absolute figures depend on it;
//! the differences within one run travel better. Every phase is bounded in
//! time; the run takes about four minutes.
//!
//! A last section runs the redis pattern with `replicas: 1` and
//! `replicas: 2` behind the proxy (`CLIENTS` calls in flight), prints the
//! throughput ratio, and where the CPU went during each throughput phase
//! (this bench's client, the proxy, the pattern processes, redis-server):
//! a second replica adds only what the machine has spare.
//!
//! `cargo bench -p trellis-tests --bench backends -- redis` runs one section
//! (`memstore`, `redis`, `postgres`, `replicas`). Run with release binaries:
//! `cargo build --release --workspace --bins` first (`make bench-backends`
//! does).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tonic::transport::Channel;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_tests::backends::{PostgresServer, RedisServer, postgres_pattern, redis_pattern};
use trellis_tests::{PatternEntry, Proxy};

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

/// A gRPC client; with `keys`, every Put carries a new idempotency key
/// (`keys` is this client's prefix and count), so the pattern records each.
struct Grpc(KeyValueClient<Channel>, Option<(String, u64)>);

impl Client for Grpc {
    fn op(&mut self, put: bool, key_index: usize) -> BoxFut<'_> {
        Box::pin(async move {
            if put {
                let mut req = tonic::Request::new(PutRequest {
                    namespace: NS.into(),
                    key: key(key_index),
                    value: VALUE.to_vec(),
                    ttl: None,
                });
                if let Some((prefix, n)) = &mut self.1 {
                    *n += 1;
                    if let Ok(v) = format!("{prefix}-{n}").parse() {
                        req.metadata_mut().insert("idempotency-key", v);
                    }
                }
                self.0.put(req).await.map(|_| ())
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

/// `CLIENTS` gRPC clients of `addr` (`http://host:port`): the proxy, or a
/// pattern's own endpoint to measure the pattern without the proxy.
async fn grpc_clients(addr: &str) -> Vec<Grpc> {
    grpc_clients_keyed(addr, false).await
}

/// As [`grpc_clients`]; `keyed`: every Put carries a new idempotency key.
async fn grpc_clients_keyed(addr: &str, keyed: bool) -> Vec<Grpc> {
    static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut v = Vec::new();
    for c in 0..CLIENTS {
        // A channel each: its own HTTP/2 connection, like separate clients.
        let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
            .expect("uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the proxy");
        let keys = keyed.then(|| (format!("bench-{}-{run}-{c}", std::process::id()), 0));
        v.push(Grpc(KeyValueClient::new(channel), keys));
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
/// latency runs from when it was sent — pacing lateness excluded, waiting
/// for a busy connection included. Returns (p50, p99, how many).
///
/// The schedule is kept by a plain thread sleeping to each send time
/// (`std::thread::sleep` has microsecond resolution; tokio's timer has
/// millisecond resolution and would send 2,000 req/s as pairs every 1 ms,
/// which makes every other request queue behind its partner).
async fn latency<C: Client>(clients: Vec<C>) -> (Duration, Duration, usize) {
    let pool: Vec<Arc<Mutex<C>>> = clients
        .into_iter()
        .map(|c| Arc::new(Mutex::new(c)))
        .collect();
    let total = (RATE * PHASE.as_secs()) as usize;
    let gap = Duration::from_nanos(1_000_000_000 / RATE);
    let (tick, mut ticks) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..total {
            let at = start + gap * i as u32;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tick.send(i).is_err() {
                return;
            }
        }
    });
    let mut choices = Choices(0x2545_F491_4F6C_DD1D);
    let mut tasks = Vec::with_capacity(total);
    while let Some(i) = ticks.recv().await {
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
    pacer.join().expect("pacing thread");
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

/// The gRPC address of pattern `name`, to reach it without the proxy.
async fn pattern_addr(proxy: &Proxy, name: &str) -> String {
    let endpoint = proxy.pattern(name).await.endpoint;
    let hostport = endpoint
        .strip_prefix("tcp://")
        .unwrap_or_else(|| panic!("bench patterns listen on TCP, got {endpoint:?}"));
    format!("http://{hostport}")
}

/// One path's figures: closed-loop throughput, then (p50, p99, n) at `RATE`.
struct Path {
    rps: f64,
    lat: (Duration, Duration, usize),
}

async fn path<C: Client>(mut clients: Vec<C>) -> Path {
    fill(&mut clients).await;
    let (rps, clients) = throughput(clients).await;
    let lat = latency(clients).await;
    Path { rps, lat }
}

/// Prints one section: every path's throughput and latency, then what each
/// step adds over the one before it (`paths[0]` is the baseline).
fn report(title: &str, paths: &[(&str, &Path)]) {
    println!("{title}");
    println!(
        "  {:<44} {:>10}   at {RATE} req/s: {:>9} {:>9}",
        "", "req/s", "p50", "p99"
    );
    for (what, p) in paths {
        println!(
            "  {what:<44} {:>10.0}   {:>18.3} {:>6.3} ms",
            p.rps,
            ms(p.lat.0),
            ms(p.lat.1)
        );
    }
    let (base_name, base) = paths[0];
    println!("  compared with \"{base_name}\":");
    for (what, p) in &paths[1..] {
        println!(
            "    {what:<44} throughput ×{:<5.2} latency added p50 {:>+7.3} ms  p99 {:>+7.3} ms",
            p.rps / base.rps,
            ms(p.lat.0) - ms(base.lat.0),
            ms(p.lat.1) - ms(base.lat.1)
        );
    }
    println!();
}

/// The pattern alone, through a bare forwarder, then through the proxy.
async fn pattern_paths(entry: PatternEntry) -> Vec<(String, Path)> {
    let name = entry.name.clone();
    let proxy = Proxy::builder()
        .log_level("warn")
        .pattern(entry)
        .start()
        .await;
    let pattern = pattern_addr(&proxy, &name).await;
    let alone = path(grpc_clients(&pattern).await).await;
    let bare = {
        let forwarder = forwarder::Child::start(&pattern).await;
        path(grpc_clients(&forwarder.addr).await).await
    };
    let proxied = path(grpc_clients(&proxy.addr).await).await;
    let keyed = path(grpc_clients_keyed(&proxy.addr, true).await).await;
    println!(
        "  {name}: Puts with idempotency keys through trellis: throughput ×{:.2} of Puts without, \
         p50 {:+.3} ms",
        keyed.rps / proxied.rps,
        ms(keyed.lat.0) - ms(proxied.lat.0)
    );
    vec![
        (format!("client → {name} pattern"), alone),
        (format!("client → bare forwarder → {name} pattern"), bare),
        (format!("client → trellis → {name} pattern"), proxied),
        (format!("client → trellis → {name}, keyed Puts"), keyed),
    ]
}

/// The least a gRPC proxy on the same stack can cost: a tonic `KeyValue`
/// server that passes each call to one tonic channel — no routing, no
/// deadline, no metadata, no health gating. Runs in a child process (this
/// bench binary again, with [`FORWARD_TO`] set) so it has its own runtime
/// and threads, as the proxy does. "trellis" minus "bare forwarder" is what
/// Trellis's own code adds to a hop.
mod forwarder {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tonic::transport::Channel;
    use tonic::{Request, Response, Status};
    use trellis_proto::data::v1::key_value_client::KeyValueClient;
    use trellis_proto::data::v1::key_value_server::{KeyValue, KeyValueServer};
    use trellis_proto::data::v1::*;

    struct Forward(KeyValueClient<Channel>);

    #[tonic::async_trait]
    impl KeyValue for Forward {
        async fn get(&self, r: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
            self.0.clone().get(r.into_inner()).await
        }
        async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            self.0.clone().put(r.into_inner()).await
        }
        async fn delete(
            &self,
            r: Request<DeleteRequest>,
        ) -> Result<Response<DeleteResponse>, Status> {
            self.0.clone().delete(r.into_inner()).await
        }
        async fn list(&self, r: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
            self.0.clone().list(r.into_inner()).await
        }
    }

    /// The child's side: connect upstream, bind, print the address, serve.
    pub async fn serve(upstream: String) {
        let channel = tonic::transport::Endpoint::from_shared(upstream)
            .expect("upstream uri")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect upstream");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("http://{}", listener.local_addr().expect("addr"));
        tonic::transport::Server::builder()
            .add_service(KeyValueServer::new(Forward(KeyValueClient::new(channel))))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .expect("serve");
    }

    /// The bench's side: the child process, killed when dropped.
    pub struct Child {
        _child: tokio::process::Child,
        pub addr: String,
    }

    impl Child {
        pub async fn start(upstream: &str) -> Child {
            let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
                .env(super::FORWARD_TO, upstream)
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn the forwarder");
            let stdout = child.stdout.take().expect("stdout");
            let addr = BufReader::new(stdout)
                .lines()
                .next_line()
                .await
                .expect("read the forwarder's address")
                .expect("the forwarder printed its address");
            Child {
                _child: child,
                addr,
            }
        }
    }
}

/// Set in the environment of this bench's own child process to make it the
/// bare forwarder (see [`forwarder`]) to the address it names.
const FORWARD_TO: &str = "TRELLIS_BENCH_FORWARD_TO";

fn main() {
    if let Ok(upstream) = std::env::var(FORWARD_TO) {
        // The forwarder runs on the runtime the proxy uses by default.
        return tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(forwarder::serve(upstream));
    }
    // The load generator runs on a current-thread runtime, which adds less
    // latency of its own than a multi-thread one.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench());
}

async fn bench() {
    println!(
        "backends: direct vs client → trellis → pattern → server; {CLIENTS} clients, 50% Get / \
         50% Put, {KEYS} keys of {} bytes, {PHASE:?} per phase\n",
        VALUE.len()
    );

    // `cargo bench --bench backends -- redis` runs only the sections named.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |section: &str| only.is_empty() || only.iter().any(|o| o == section);

    if run("memstore") {
        memstore_section().await;
    }
    if run("redis") {
        redis_section().await;
    }
    if run("postgres") {
        postgres_section().await;
    }
    if run("replicas") {
        replicas_section().await;
    }
}

async fn memstore_section() {
    let paths = pattern_paths(PatternEntry::new(
        "memstore",
        trellis_tests::bin("trellis-memstore"),
        &[NS],
    ))
    .await;
    let paths: Vec<(&str, &Path)> = paths.iter().map(|(n, p)| (n.as_str(), p)).collect();
    report("reference: memstore, no backend server", &paths);
}

async fn redis_section() {
    let redis = RedisServer::start_in_memory().await;
    let direct = path(redis_clients(&redis.url()).await).await;
    let via = pattern_paths(redis_pattern("redis", &[NS], &redis.url(), "")).await;
    let mut paths = vec![("client → redis-server directly", &direct)];
    paths.extend(via.iter().map(|(n, p)| (n.as_str(), p)));
    report(
        "Redis (no persistence; direct = GET/SET; the pattern's Put also keeps the List index)",
        &paths,
    );
}

async fn postgres_section() {
    let pg = PostgresServer::start_with(&[("synchronous_commit", "off")]).await;
    let entry = postgres_pattern(
        "postgres",
        &[NS],
        &pg.url(),
        &format!("pool:\n  max_size: {CLIENTS}"),
    );
    // The pattern creates the table the direct clients use.
    let via = pattern_paths(entry).await;
    let direct = path(pg_clients(&pg).await).await;
    let mut paths = vec![("client → PostgreSQL directly", &direct)];
    paths.extend(via.iter().map(|(n, p)| (n.as_str(), p)));
    report(
        "PostgreSQL (synchronous_commit off; direct = the pattern's SELECT and upsert)",
        &paths,
    );
}

/// Redis behind the proxy with one and with two pattern replicas: the
/// throughput ratio, and the CPU each process used during the throughput
/// phase (in cores: CPU seconds per second), which says why.
async fn replicas_section() {
    let redis = RedisServer::start_in_memory().await;
    let redis_pid = redis.pid().expect("redis-server runs");
    println!(
        "pattern replicas: client → trellis → redis pattern × N → redis-server, {CLIENTS} in \
         flight, {PHASE:?}"
    );
    let mut rates = Vec::new();
    for n in [1u32, 2] {
        let proxy = Proxy::builder()
            .log_level("warn")
            .pattern(redis_pattern("redis", &[NS], &redis.url(), ""))
            .with(&format!("replicas: {n}"))
            .start()
            .await;
        let names: Vec<String> = if n == 1 {
            vec!["redis".into()]
        } else {
            (0..n).map(|i| format!("redis-{i}")).collect()
        };
        let mut pids = Vec::new();
        for name in &names {
            proxy.wait_serving(name).await;
            pids.push(proxy.pattern(name).await.pid);
        }
        let mut clients = grpc_clients(&proxy.addr).await;
        fill(&mut clients).await;
        let me = std::process::id();
        let cpu =
            |pids: &[u32]| -> f64 { pids.iter().map(|&p| trellis_tests::cpu_seconds(p)).sum() };
        let before = [
            cpu(&[me]),
            cpu(&[proxy.pid()]),
            cpu(&pids),
            cpu(&[redis_pid]),
        ];
        let start = Instant::now();
        let (rps, _) = throughput(clients).await;
        let took = start.elapsed().as_secs_f64();
        let after = [
            cpu(&[me]),
            cpu(&[proxy.pid()]),
            cpu(&pids),
            cpu(&[redis_pid]),
        ];
        let cores: Vec<f64> = after
            .iter()
            .zip(before)
            .map(|(a, b)| (a - b) / took)
            .collect();
        println!(
            "  replicas: {n}  {rps:>9.0} req/s   cores used: client {:.2}, trellis {:.2}, \
             pattern{} {:.2}, redis-server {:.2} (sum {:.2} of {})",
            cores[0],
            cores[1],
            if n == 1 { "" } else { "s" },
            cores[2],
            cores[3],
            cores.iter().sum::<f64>(),
            std::thread::available_parallelism().map_or(0, |c| c.get()),
        );
        rates.push((rps, cores));
    }
    let (one, two) = (&rates[0], &rates[1]);
    println!(
        "  2 replicas / 1 replica: throughput ×{:.2}. One pattern process used {:.2} cores and \
         the whole path {:.2} of {}: a second process can add only CPU the machine has spare, \
         and costs its own share (the patterns used {:.2} cores, ×{:.2} per call). Replicas buy \
         throughput where one pattern process is the ceiling (a CPU-bound pattern, more \
         cores); on any machine they buy availability.\n",
        two.0 / one.0,
        one.1[2],
        one.1.iter().sum::<f64>(),
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        two.1[2],
        (two.1[2] / two.0) / (one.1[2] / one.0),
    );
}
