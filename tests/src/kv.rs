//! Key-value request builders and a background writer, shared by the
//! end-to-end tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{GetRequest, PutRequest};

use crate::Proxy;

pub fn put(ns: &str, key: &str, value: &[u8]) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value: value.to_vec(),
        ttl: None,
    }
}

pub fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

/// Writes `w/<n>` keys one after another until told to stop; returns every
/// write that was acknowledged, and how many failed. A failed write is
/// retried with the next key after a short pause, so an outage is probed
/// steadily without a busy loop.
pub fn spawn_writer(
    proxy: &Proxy,
    ns: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(BTreeMap<String, Vec<u8>>, usize)> {
    let addr = proxy.addr.clone();
    tokio::spawn(async move {
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut kv = KeyValueClient::new(channel);
        let mut acked = BTreeMap::new();
        let mut failed = 0;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = format!("w/{n:08}");
            let value = format!("value {n}").into_bytes();
            match kv.put(put(ns, &key, &value)).await {
                Ok(_) => {
                    acked.insert(key, value);
                }
                Err(_) => {
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        (acked, failed)
    })
}

/// `message` with an `idempotency-key` (docs/idempotency.md).
pub fn with_idempotency_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("idempotency-key", key.parse().expect("a valid key"));
    req
}

/// Whether an answer is marked `idempotent-replayed: true`.
pub fn idempotent_replayed<T>(r: &tonic::Response<T>) -> bool {
    r.metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}
