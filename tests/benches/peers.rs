//! `make bench-peers`: trellis as a gRPC hop beside nginx and HAProxy, in one
//! run, against one memstore pattern. Paths:
//!
//! Every memstore here listens on loopback TCP (`transport: tcp`), as the
//! peers need, and gets the per-start secret every caller must send: nginx
//! and HAProxy set the header, the direct route sends it (read from the
//! pattern's environment).
//!
//! - h2load → memstore directly (the pattern's own endpoint, from the admin
//!   API's GetPattern): the baseline;
//! - h2load → nginx (`grpc_pass`, upstream `keepalive`) → memstore;
//! - h2load → HAProxy (`proto h2` on both sides, `nbthread 1`) → memstore;
//! - h2load → trellis → memstore (the trellis that spawned that memstore,
//!   with its defaults: `worker_threads` half the cores, metrics on, traces
//!   off);
//! - five more trellis instances, each with its own memstore, started at
//!   the beginning and left running (idle, they only health-check their
//!   pattern once a second) so every round measures every path: with
//!   `worker_threads: 2`; with metrics off (`telemetry.metrics: false`),
//!   the baseline for what metrics cost; and with traces on for every call
//!   (`sampling_ratio: 1.0`), exporting to an OTLP collector in this
//!   process (`trellis_tests::otlp`), for what traces cost; and one with
//!   its memstore on a Unix socket, the default transport; and one with
//!   TLS on its doors (a test certificate; h2load negotiates h2 by ALPN).
//!
//! The workload is the unary `trellis.data.v1.KeyValue/Get` of one key
//! holding a 100-byte value (Put through each trellis first), sent by
//! `h2load` from a pre-encoded gRPC request body over one HTTP/2 connection:
//! with one request in flight (`-m 1`: mean latency) and with 16 concurrent
//! streams on that connection (`-m 16`, as one gRPC channel would: requests
//! per second). Before measuring, one tonic call checks each path answers
//! the Get with grpc-status OK and the value; during the measurement, each
//! run's received DATA bytes must be exactly one full response per request
//! (h2load only sees HTTP 200, and a gRPC error is also a 200).
//!
//! A short calibration run per path and measure (which also warms it up)
//! sets the request count so each measurement takes about
//! [`MEASURE_SECS`]. Then [`ROUNDS`] rounds, each visiting the paths in a
//! rotated order; the table shows the median per path and measure, with the
//! range over the rounds. h2load, the proxies and the pattern share this
//! machine's cores, so the ratios within one run travel better than the
//! absolute figures. The run takes about three minutes.
//!
//! Needs `h2load`, `nginx` and `haproxy` (`scripts/setup-peers.sh`, run by
//! `make bench-peers`, installs them) and release binaries: `cargo build
//! --release --workspace --bins` first (`make bench-peers` does).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::process::{Child, Command};
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, GetResponse, PutRequest};
use trellis_tests::{PATIENCE, Proxy};

const NS: &str = "bench";
const KEY: &str = "bench/key";
const VALUE: [u8; 100] = [b'v'; 100];
const ROUNDS: usize = 5;
const MEASURE_SECS: f64 = 2.5;
/// Streams in flight on the one connection for the throughput measure.
const STREAMS: u32 = 16;

/// One way to reach the memstore, and its figures over the rounds.
struct Route {
    name: String,
    /// `http://host:port`
    url: String,
    /// Extra request headers (the pattern's secret, on the direct route).
    headers: Vec<(String, String)>,
    /// The CA to trust, for an `https://` route.
    ca_pem: Option<String>,
    /// Requests per h2load run, 1 in flight and `STREAMS` in flight.
    n: [u64; 2],
    /// Mean latency in µs, 1 in flight, one per round.
    mean_us: Vec<f64>,
    /// Requests per second, `STREAMS` in flight, one per round.
    rps: Vec<f64>,
}

impl Route {
    fn new(name: impl Into<String>, url: String) -> Route {
        Route {
            name: name.into(),
            url,
            headers: Vec::new(),
            ca_pem: None,
            n: [0; 2],
            mean_us: Vec::new(),
            rps: Vec::new(),
        }
    }
}

// Peers ------------------------------------------------------------------------

/// A proxy run from a config in its own temporary folder; killed when dropped.
struct Peer {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    /// Runs `program conf_flag FILE args…` (nginx or HAProxy, in the
    /// foreground) with FILE written by `config` from the folder and the port
    /// to listen on, then awaits that port.
    async fn start(
        program: &str,
        conf_flag: &str,
        args: &[&str],
        config: impl Fn(&Path, u16) -> String,
    ) -> Peer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let file = dir.path().join(format!("{program}.conf"));
        std::fs::write(&file, config(dir.path(), port)).expect("write the peer's config");
        let log = dir.path().join(format!("{program}.log"));
        let log_file = std::fs::File::create(&log).expect("create the peer's log");
        let child = Command::new(tool(program))
            .arg(conf_flag)
            .arg(&file)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let mut peer = Peer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        peer.await_port(program, port).await;
        peer
    }

    /// Waits until the port accepts connections; panics with the peer's log
    /// when it exits first or never does.
    async fn await_port(&mut self, name: &str, port: u16) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "{name} did not start listening on port {port} ({}); its log:\n{}",
                    exited.map_or("timed out".into(), |s| s.to_string()),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// nginx in one process (`master_process off`: nothing survives a kill),
/// everything it writes in `dir`. nginx proxies each gRPC call on an
/// upstream connection of its own (it does not multiplex upstream streams);
/// `keepalive` keeps those connections for reuse. `keepalive_requests` is
/// raised on both sides: its default of 1,000 would close the client's
/// connection (GOAWAY) in the middle of a run.
async fn start_nginx(upstream: u16, secret: &str) -> Peer {
    Peer::start("nginx", "-c", &["-e", "stderr"], |dir, port| {
        let d = dir.display();
        format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000000;
    upstream pattern {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_set_header {SECRET_HEADER} {secret};
            grpc_pass grpc://pattern;
        }}
    }}
}}
"
        )
    })
    .await
}

/// HAProxy in the foreground (`-db`), one thread, HTTP/2 cleartext on both
/// sides; its backend multiplexes streams on its connections to the pattern.
async fn start_haproxy(upstream: u16, secret: &str) -> Peer {
    Peer::start("haproxy", "-f", &["-db"], |_, port| {
        format!(
            "global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend pattern
backend pattern
    http-request set-header {SECRET_HEADER} {secret}
    server memstore 127.0.0.1:{upstream} proto h2
"
        )
    })
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port()
}

/// Where `name` is installed: `PATH`, then the sbin folders (nginx and
/// haproxy are in /usr/sbin, which is not on every user's `PATH`).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/setup-peers.sh (make bench-peers does)")
        })
}

/// The first line `program` prints for `arg`, e.g. "nginx version: nginx/1.22.1".
fn version(program: &str, arg: &str) -> String {
    let out = std::process::Command::new(tool(program))
        .arg(arg)
        .output()
        .unwrap_or_else(|e| panic!("run {program} {arg}: {e}"));
    let text = [out.stdout, out.stderr].concat();
    let text = String::from_utf8_lossy(&text);
    text.lines().next().unwrap_or("").trim().to_string()
}

// Trellis -----------------------------------------------------------------------

/// A trellis with one memstore serving `NS` over loopback TCP (as the
/// peers reach it), the key put through it.
async fn start_trellis(top: &str) -> Proxy {
    start_trellis_with(top, "transport: tcp").await
}

/// [`start_trellis`] with `pattern` as the memstore entry's extra YAML.
async fn start_trellis_with(top: &str, pattern: &str) -> Proxy {
    let proxy = Proxy::builder()
        .log_level("warn")
        .top(top)
        .memstore("memstore", &[NS])
        .with(pattern)
        .start()
        .await;
    proxy
        .kv()
        .await
        .put(put_key())
        .await
        .unwrap_or_else(|s| panic!("Put through trellis: {:?}: {}", s.code(), s.message()));
    proxy
}

/// The Put of the key every route then Gets.
fn put_key() -> PutRequest {
    PutRequest {
        namespace: NS.into(),
        key: KEY.into(),
        value: VALUE.to_vec(),
        ttl: None,
    }
}

/// The memstore's own port, from the admin API (`tcp://127.0.0.1:PORT`).
async fn pattern_port(proxy: &Proxy) -> u16 {
    let endpoint = proxy.pattern("memstore").await.endpoint;
    endpoint
        .strip_prefix("tcp://")
        .and_then(|hostport| hostport.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("expected a tcp://HOST:PORT pattern endpoint, got {endpoint:?}"))
}

/// The secret the proxy gave its memstore (the process's initial
/// environment): the peers must send it, as the proxy does, or the pattern
/// refuses them.
async fn pattern_secret(proxy: &Proxy) -> String {
    let pid = proxy.pattern("memstore").await.pid;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("read memstore's environment: {e}"));
    let prefix = format!("{}=", trellis_proto::protocol::env::SECRET);
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(prefix.as_str()).map(str::to_string))
        .expect("memstore was started with a secret")
}

/// A tonic endpoint for `route` (TLS trusting its CA for `https://`).
fn endpoint(route: &Route) -> tonic::transport::Endpoint {
    let e = tonic::transport::Endpoint::from_shared(route.url.clone()).expect("uri");
    match &route.ca_pem {
        None => e,
        Some(ca) => e
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name("localhost"),
            )
            .expect("TLS config"),
    }
}

/// A trellis like [`start_trellis`] with TLS on its doors (certificates
/// from `pki`), the key put through it over TLS once it serves.
async fn start_trellis_tls(pki: &trellis_tests::pki::Pki) -> (Proxy, Route) {
    let proxy = Proxy::builder()
        .log_level("warn")
        .top(&format!(
            "tls:\n  cert_file: {:?}\n  key_file: {:?}\n",
            pki.server_cert(),
            pki.server_key()
        ))
        .memstore("memstore", &[NS])
        .with("transport: tcp")
        .spawn()
        .await;
    let mut route = Route::new(TLS, proxy.addr.replacen("http://", "https://", 1));
    route.ca_pem = Some(std::fs::read_to_string(pki.ca()).expect("the test CA"));
    // Its health is asked over TLS here, so `start` (plaintext) cannot wait.
    trellis_tests::eventually("the TLS trellis to serve a Put", || async {
        let channel = endpoint(&route).connect().await.ok()?;
        KeyValueClient::new(channel).put(put_key()).await.ok()
    })
    .await;
    (proxy, route)
}

/// One real gRPC Get over the route: it must answer OK with the value.
async fn verify(route: &Route) {
    let what = format!("{} at {}", route.name, route.url);
    let channel = endpoint(route)
        .connect_timeout(PATIENCE)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let mut request = tonic::Request::new(GetRequest {
        namespace: NS.into(),
        key: KEY.into(),
    });
    for (k, v) in &route.headers {
        let name = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).expect("header name");
        request
            .metadata_mut()
            .insert(name, v.parse().expect("header value"));
    }
    let reply = KeyValueClient::new(channel)
        .get(request)
        .await
        .unwrap_or_else(|s| panic!("{what}: Get failed: {:?}: {}", s.code(), s.message()));
    assert_eq!(
        reply.into_inner().value,
        VALUE,
        "{what}: Get answered OK but not with the value that was put"
    );
}

// h2load ------------------------------------------------------------------------

/// One h2load run's figures.
struct Run {
    rps: f64,
    mean_us: f64,
}

/// The gRPC request body h2load sends: the length-prefixed message
/// (compressed flag 0, 4-byte big-endian length, the encoded GetRequest).
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let len = u32::try_from(bytes.len()).expect("small message");
    [&[0u8][..], &len.to_be_bytes(), &bytes].concat()
}

/// `n` Gets over one connection with `streams` in flight.
async fn h2load(route: &Route, body: &Path, n: u64, streams: u32) -> Run {
    let out = Command::new(tool("h2load"))
        .args(["-n", &n.to_string(), "-c", "1", "-m", &streams.to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(
            route
                .headers
                .iter()
                .flat_map(|(k, v)| ["-H".to_string(), format!("{k}: {v}")]),
        )
        .arg("-d")
        .arg(body)
        .arg(format!("{}/trellis.data.v1.KeyValue/Get", route.url))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    let response = grpc_frame(&GetResponse {
        value: VALUE.to_vec(),
    });
    parse_h2load(&text, n, response.len() as u64).unwrap_or_else(|e| {
        panic!(
            "h2load against {} ({}): {e}; its output:\n{text}{}",
            route.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Reads req/s and the mean request time from h2load's report, after
/// checking that all `n` requests succeeded and each got a full response
/// (`response_len` DATA bytes: a gRPC error has none, yet is an HTTP 200).
fn parse_h2load(text: &str, n: u64, response_len: u64) -> Result<Run, String> {
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .ok_or(format!("no {prefix:?} line"))
    };
    let succeeded = line("requests:")?
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" succeeded"))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("no succeeded count")?;
    if succeeded != n {
        return Err(format!("{succeeded} of {n} requests succeeded"));
    }
    let data = line("traffic:")?
        .split(", ")
        .find_map(|part| part.strip_suffix(") data"))
        .and_then(|part| part.rsplit_once('('))
        .and_then(|(_, bytes)| bytes.parse::<u64>().ok())
        .ok_or("no DATA byte count")?;
    if data != n * response_len {
        return Err(format!(
            "{data} DATA bytes received, expected {} ({n} responses of {response_len} bytes): \
             some calls failed with a gRPC error",
            n * response_len
        ));
    }
    let rps = line("finished in")?
        .split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .ok_or("no req/s figure")?;
    // "time for request:  min  max  mean  sd  +/- sd"
    let mean = line("time for request:")?
        .split_whitespace()
        .nth(2)
        .ok_or("no mean request time")?;
    Ok(Run {
        rps,
        mean_us: micros(mean).ok_or(format!("cannot read the duration {mean:?}"))?,
    })
}

/// h2load's durations: "119.00us", "1.03ms", "1.20s".
fn micros(s: &str) -> Option<f64> {
    let (number, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e3)
    } else {
        (s.strip_suffix('s')?, 1e6)
    };
    number.parse::<f64>().ok().map(|v| v * scale)
}

// Report ------------------------------------------------------------------------

/// (median, min, max)
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn report(routes: &[Route]) {
    println!(
        "| path | 1 in flight: mean latency (range) | added over direct | \
         {STREAMS} in flight: req/s (range) | share of direct |"
    );
    println!("|---|---:|---:|---:|---:|");
    let (direct_us, ..) = spread(&routes[0].mean_us);
    let (direct_rps, ..) = spread(&routes[0].rps);
    for (i, r) in routes.iter().enumerate() {
        let (us, us_min, us_max) = spread(&r.mean_us);
        let (rps, rps_min, rps_max) = spread(&r.rps);
        let added = if i == 0 {
            "—".to_string()
        } else {
            format!("{:+.0} µs", us - direct_us)
        };
        println!(
            "| {} | {us:.0} µs ({us_min:.0}–{us_max:.0}) | {added} | \
             {rps:.0} ({rps_min:.0}–{rps_max:.0}) | {:.2} |",
            r.name,
            rps / direct_rps
        );
    }
}

fn find<'a>(routes: &'a [Route], name: &str) -> &'a Route {
    routes
        .iter()
        .find(|r| r.name == name)
        .expect("route by name")
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("(date failed: {e})"))
}

const DIRECT: &str = "direct → memstore";
const NGINX: &str = "nginx `grpc_pass` → memstore";
const HAPROXY: &str = "HAProxy (h2, `nbthread 1`) → memstore";
const TRELLIS: &str = "trellis → memstore";
const NO_METRICS: &str = "trellis, metrics off → memstore";
const TRACED: &str = "trellis, traces on (every call) → memstore";
const UNIX: &str = "trellis → memstore on a Unix socket (the default)";
const TLS: &str = "trellis, TLS on the door → memstore";
use trellis_proto::protocol::SECRET_HEADER;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "peers: trellis as a gRPC hop beside nginx and HAProxy, run {}, {cores} cores",
        now_utc()
    );
    println!(
        "  KeyValue/Get of one {}-byte value by h2load over one HTTP/2 connection; \
         {ROUNDS} rounds, median (range); ~{MEASURE_SECS}s per measurement",
        VALUE.len()
    );
    println!(
        "  {}; {}; {}\n",
        version("h2load", "--version"),
        version("nginx", "-v"),
        version("haproxy", "-v")
    );

    // Spans from the traced trellis (and its memstore) go to a collector in
    // this process, as they would to a real one.
    let (spans, collector_url) = trellis_tests::otlp::collector().await;
    let mut trellis = start_trellis("").await;
    let mut two_threads = start_trellis("worker_threads: 2\n").await;
    let mut no_metrics = start_trellis("telemetry:\n  metrics: false\n").await;
    let mut traced = start_trellis(&format!(
        "telemetry:\n  traces:\n    endpoint: {collector_url}\n    sampling_ratio: 1.0\n"
    ))
    .await;
    // The default transport, a Unix socket, beside the TCP the peers need.
    let mut unix = start_trellis_with("", "").await;
    // TLS on the door (h2load negotiates h2 by ALPN and does not verify).
    let pki = trellis_tests::pki::Pki::generate();
    let (mut tls, tls_route) = start_trellis_tls(&pki).await;
    let port = pattern_port(&trellis).await;
    let secret = pattern_secret(&trellis).await;
    let nginx = start_nginx(port, &secret).await;
    let haproxy = start_haproxy(port, &secret).await;

    let mut direct = Route::new(DIRECT, format!("http://127.0.0.1:{port}"));
    direct.headers = vec![(SECRET_HEADER.to_string(), secret.clone())];
    let mut routes = vec![
        direct,
        Route::new(NGINX, nginx.url.clone()),
        Route::new(HAPROXY, haproxy.url.clone()),
        Route::new(TRELLIS, trellis.addr.clone()),
        Route::new(
            "trellis `worker_threads: 2` → memstore",
            two_threads.addr.clone(),
        ),
        Route::new(NO_METRICS, no_metrics.addr.clone()),
        Route::new(TRACED, traced.addr.clone()),
        Route::new(UNIX, unix.addr.clone()),
        tls_route,
    ];

    let dir = tempfile::tempdir().expect("tempdir");
    let body = dir.path().join("get.bin");
    let request = GetRequest {
        namespace: NS.into(),
        key: KEY.into(),
    };
    std::fs::write(&body, grpc_frame(&request)).expect("write the request body");

    // Verify every path, then calibrate (and warm up) each measure.
    for route in &mut routes {
        verify(route).await;
        for (i, (trial, streams)) in [(2_000, 1), (10_000, STREAMS)].into_iter().enumerate() {
            let run = h2load(route, &body, trial, streams).await;
            route.n[i] = ((run.rps * MEASURE_SECS / 1000.0).round() as u64).max(1) * 1000;
        }
    }

    let count = routes.len();
    for round in 0..ROUNDS {
        for i in 0..count {
            let route = &mut routes[(i + round) % count];
            let one = h2load(route, &body, route.n[0], 1).await;
            let many = h2load(route, &body, route.n[1], STREAMS).await;
            route.mean_us.push(one.mean_us);
            route.rps.push(many.rps);
        }
        eprintln!("  round {} of {ROUNDS} done", round + 1);
    }

    report(&routes);
    let (direct_us, ..) = spread(&find(&routes, DIRECT).mean_us);
    let (trellis_us, ..) = spread(&find(&routes, TRELLIS).mean_us);
    let (haproxy_us, ..) = spread(&find(&routes, HAPROXY).mean_us);
    let (trellis_rps, ..) = spread(&find(&routes, TRELLIS).rps);
    let (haproxy_rps, ..) = spread(&find(&routes, HAPROXY).rps);
    println!(
        "\n{STREAMS} in flight: trellis throughput / HAProxy throughput = {:.2} (target ≥ 1.00)",
        trellis_rps / haproxy_rps
    );
    println!(
        "1 in flight: trellis added mean latency {:.0} µs vs HAProxy's {:.0} µs (target ≤)",
        trellis_us - direct_us,
        haproxy_us - direct_us
    );
    let (bare_rps, ..) = spread(&find(&routes, NO_METRICS).rps);
    let (traced_rps, ..) = spread(&find(&routes, TRACED).rps);
    let (traced_us, ..) = spread(&find(&routes, TRACED).mean_us);
    println!(
        "{STREAMS} in flight: metrics on / metrics off throughput = {:.2} (target ≥ 0.95)",
        trellis_rps / bare_rps
    );
    println!(
        "traces on, every call sampled: throughput ×{:.2} of traces off, +{:.0} µs mean at \
         1 in flight; {} spans received by the collector",
        traced_rps / trellis_rps,
        traced_us - trellis_us,
        spans.spans.lock().map(|s| s.len()).unwrap_or(0)
    );
    let (unix_us, ..) = spread(&find(&routes, UNIX).mean_us);
    let (unix_rps, ..) = spread(&find(&routes, UNIX).rps);
    println!(
        "the pattern on a Unix socket (the default) / on loopback TCP: throughput ×{:.2}, \
         {:+.0} µs mean at 1 in flight",
        unix_rps / trellis_rps,
        unix_us - trellis_us
    );
    let (tls_us, ..) = spread(&find(&routes, TLS).mean_us);
    let (tls_rps, ..) = spread(&find(&routes, TLS).rps);
    println!(
        "TLS on the door / plaintext: throughput ×{:.2}, {:+.0} µs mean at 1 in flight \
         (one connection, so the handshake is not in it: the record layer is)",
        tls_rps / trellis_rps,
        tls_us - trellis_us
    );
    println!("(run took {:.0} s)", started.elapsed().as_secs_f64());
    // On a panic, the drops kill everything (and the patterns die with
    // their proxy); here the proxies stop their patterns gracefully.
    drop((nginx, haproxy));
    for proxy in [
        &mut trellis,
        &mut two_threads,
        &mut no_metrics,
        &mut traced,
        &mut unix,
        &mut tls,
    ] {
        proxy.terminate().await;
    }
}
