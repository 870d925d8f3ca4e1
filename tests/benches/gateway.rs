//! `make bench-gateway`: the same KV Get/Put workload through the HTTP
//! gateway and through gRPC, in one run, against one proxy and memstore.
//! Prints requests per second and p50/p99 for both and their ratio (the
//! ratio is the figure to watch; absolute numbers depend on the machine).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_proto::data::v1::{GetRequest, PutRequest};
use trellis_tests::Proxy;

const CLIENTS: usize = 16;
const PER_CLIENT: usize = 1500;

struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn summarize(mut lat: Vec<Duration>, wall: Duration) -> Run {
    lat.sort();
    let pick = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    Run {
        rps: lat.len() as f64 / wall.as_secs_f64(),
        p50: pick(0.5),
        p99: pick(0.99),
    }
}

async fn grpc_run(proxy: &Proxy) -> Run {
    let channel = proxy.channel().await;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut kv =
                trellis_proto::data::v1::key_value_client::KeyValueClient::new(channel.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(PER_CLIENT);
                for i in 0..PER_CLIENT {
                    let key = format!("k{c}-{}", i % 100);
                    let t = Instant::now();
                    if i % 2 == 0 {
                        kv.put(PutRequest {
                            namespace: "default".into(),
                            key,
                            value: b"hello world".to_vec(),
                            ttl: None,
                        })
                        .await
                        .expect("put");
                    } else {
                        let _ = kv
                            .get(GetRequest {
                                namespace: "default".into(),
                                key,
                            })
                            .await;
                    }
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    summarize(all, t0.elapsed())
}

async fn http_run(proxy: &Proxy) -> Run {
    let base = proxy.http.clone().expect("gateway on");
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS)
        .build_http::<Full<Bytes>>();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = client.clone();
            let base = base.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(PER_CLIENT);
                for i in 0..PER_CLIENT {
                    let url = format!("{base}/v1/namespaces/default/keys/k{c}-{}", i % 100);
                    let req = if i % 2 == 0 {
                        Request::put(url)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"value":"aGVsbG8gd29ybGQ="}"#,
                            )))
                    } else {
                        Request::get(url).body(Full::new(Bytes::new()))
                    }
                    .expect("request");
                    let t = Instant::now();
                    let resp = client.request(req).await.expect("http");
                    let _ = resp.into_body().collect().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    summarize(all, t0.elapsed())
}

fn show(name: &str, r: &Run) {
    println!(
        "{name:<6} {:>9.0} req/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
        r.rps,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let proxy = Proxy::builder()
        .log_level("warn")
        .memstore("mem", &["default"])
        .start()
        .await;
    println!(
        "gateway benchmark: {CLIENTS} concurrent clients × {PER_CLIENT} requests, half Put, half Get"
    );
    // Warm both paths, then alternate so drift hits both equally.
    let _ = grpc_run(&proxy).await;
    let _ = http_run(&proxy).await;
    let (g1, h1) = (grpc_run(&proxy).await, http_run(&proxy).await);
    let (h2, g2) = (http_run(&proxy).await, grpc_run(&proxy).await);
    let grpc = Run {
        rps: (g1.rps + g2.rps) / 2.0,
        p50: (g1.p50 + g2.p50) / 2,
        p99: (g1.p99 + g2.p99) / 2,
    };
    let http = Run {
        rps: (h1.rps + h2.rps) / 2.0,
        p50: (h1.p50 + h2.p50) / 2,
        p99: (h1.p99 + h2.p99) / 2,
    };
    show("gRPC", &grpc);
    show("HTTP", &http);
    println!(
        "HTTP / gRPC throughput: {:.0}% (target: at least 70%)",
        100.0 * http.rps / grpc.rps
    );
}
