//! `make bench-supervisor`: how fast the supervisor notices a crash, gets a
//! pattern serving again, cold-starts patterns, and how little it costs at
//! idle. Figures are printed, not asserted; each is set beside a baseline
//! measured in the same run (a bare memstore spawned by this process and
//! polled until its health check answers), so the ratio holds on a noisy
//! machine even when absolute times do not.
//!
//! Run with release binaries: `cargo build --release --workspace --bins &&
//! cargo bench -p trellis-tests --bench supervisor`.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis_proto::admin::v1::{PatternState, WatchPatternsRequest};
use trellis_proto::data::v1::GetRequest;
use trellis_tests::{Proxy, bin, cpu_seconds};

const CRASHES: usize = 30;
const COLD_STARTS: usize = 5;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let pick = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    (pick(0.5), pick(0.9), pick(1.0))
}

fn line(what: &str, v: Vec<Duration>) -> f64 {
    let n = v.len();
    let (p50, p90, max) = summary(v);
    println!("{what:<48} median {p50:>8.2} ms   p90 {p90:>8.2} ms   max {max:>8.2} ms   (n={n})");
    p50
}

/// The floor: spawn a memstore directly, read its handshake, and poll its
/// health until SERVING — what any supervisor must at least wait for.
async fn bare_spawn_to_serving() -> Duration {
    use tokio::io::AsyncBufReadExt;
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(bin("trellis-memstore"))
        .env("TRELLIS_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn memstore");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let handshake = lines.next_line().await.unwrap().unwrap();
    let addr = handshake.split('|').nth(3).unwrap().to_string();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Initialize + Start, as the proxy does, then the first SERVING.
    let mut lifecycle =
        trellis_proto::pattern::v1::lifecycle_client::LifecycleClient::new(channel.clone());
    lifecycle
        .initialize(trellis_proto::pattern::v1::InitializeRequest {
            name: "bare".into(),
            config: None,
            protocol_version: 1,
        })
        .await
        .unwrap();
    lifecycle
        .start(trellis_proto::pattern::v1::StartRequest {})
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    loop {
        let r = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
            break;
        }
    }
    let took = t0.elapsed();
    let _ = child.start_kill();
    let _ = child.wait().await;
    took
}

async fn crash_figures() -> (f64, f64) {
    let proxy = Proxy::builder()
        .log_level("warn")
        .memstore("mem", &["default"])
        .with("restart:\n  initial_backoff: 1ms\n  max_backoff: 1ms\n  reset_after: 1ms\n  max_starts: 1000")
        .start()
        .await;
    let mut admin = proxy.admin().await;
    let mut kv = proxy.kv().await;
    let mut detect = Vec::new();
    let mut serving_again = Vec::new();
    for _ in 0..CRASHES {
        proxy.wait_serving("").await;
        let mut events = admin
            .watch_patterns(WatchPatternsRequest { name: "mem".into() })
            .await
            .unwrap()
            .into_inner();
        let first = events.message().await.unwrap().unwrap().pattern.unwrap();
        assert_eq!(first.state(), PatternState::Serving);
        let t0 = Instant::now();
        kill(Pid::from_raw(first.pid as i32), Signal::SIGKILL).unwrap();
        // Detected: the proxy reports the pattern out of SERVING.
        loop {
            let ev = events.message().await.unwrap().unwrap();
            if ev.pattern.unwrap().state() != PatternState::Serving {
                detect.push(t0.elapsed());
                break;
            }
        }
        // Serving again, as a client of the proxy sees it: a Get that is not
        // UNAVAILABLE (memstore lost its data, so NOT_FOUND is the success).
        loop {
            let r = kv
                .get(GetRequest {
                    namespace: "default".into(),
                    key: "k".into(),
                })
                .await;
            match r {
                Ok(_) => break,
                Err(s) if s.code() == Code::NotFound => break,
                Err(_) => tokio::task::yield_now().await,
            }
        }
        serving_again.push(t0.elapsed());
    }
    let d = line("crash → detected (SIGKILL → event)", detect);
    let s = line(
        "crash → serving again (client polling proxy)",
        serving_again,
    );
    (d, s)
}

async fn cold_start(n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for _ in 0..COLD_STARTS {
        let mut b = Proxy::builder().log_level("warn");
        for i in 0..n {
            b = b.memstore(&format!("m{i}"), &[&format!("ns{i}")]);
        }
        let t0 = Instant::now();
        let mut proxy = b.spawn().await;
        proxy.wait_serving("").await;
        out.push(t0.elapsed());
        proxy.terminate().await;
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::main]
async fn main() {
    println!(
        "supervisor benchmark (release binaries in {})",
        trellis_tests::target_dir().display()
    );
    let mut bare = Vec::new();
    for _ in 0..CRASHES {
        bare.push(bare_spawn_to_serving().await);
    }
    let floor = line("baseline: bare spawn → SERVING (no proxy)", bare);

    let (_detect, again) = crash_figures().await;
    println!(
        "{:<48} {:.2}× the bare spawn",
        "  serving again / baseline",
        again / floor
    );

    let one = line("cold start, 1 pattern → all SERVING", cold_start(1).await);
    let twenty = line(
        "cold start, 20 patterns → all SERVING",
        cold_start(20).await,
    );
    println!(
        "{:<48} {:.2}× / {:.2}× the bare spawn",
        "  cold start 1 / 20 vs baseline",
        one / floor,
        twenty / floor
    );

    let mut b = Proxy::builder().log_level("warn");
    for i in 0..20 {
        b = b.memstore(&format!("m{i}"), &[&format!("ns{i}")]);
    }
    let mut proxy = b.start().await;
    let pid = proxy.pid();
    let window = Duration::from_secs(10);
    let children = proxy.children();
    let before = cpu_seconds(pid);
    let children_before: f64 = children.iter().map(|&c| cpu_seconds(c)).sum();
    tokio::time::sleep(window).await; // measuring idle: nothing to await but time
    let used = cpu_seconds(pid) - before;
    let children_used = children.iter().map(|&c| cpu_seconds(c)).sum::<f64>() - children_before;
    let percent = |secs: f64| 100.0 * secs / window.as_secs_f64();
    println!(
        "{:<48} {:.2}% of a core over {}s, RSS {} KiB (the proxy polls each every 1s)",
        "idle proxy with 20 patterns",
        percent(used),
        window.as_secs(),
        rss_kib(pid)
    );
    println!(
        "{:<48} {:.2}% of a core together, RSS {} KiB each (the SDK polls its hook every 250ms)",
        "  the 20 idle memstores",
        percent(children_used),
        children.iter().map(|&c| rss_kib(c)).sum::<u64>() / children.len().max(1) as u64
    );
    proxy.terminate().await;
}
