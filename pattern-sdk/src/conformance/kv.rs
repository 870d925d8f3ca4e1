//! The key-value conformance suite: checks any `trellis.data.v1.KeyValue`
//! endpoint — a pattern process, or the proxy in front of one — against the
//! contract in `proto/trellis/data/v1/keyvalue.proto` and
//! `pattern-sdk/README.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pattern_sdk::conformance::kv::{self, Kit, PatternProcess};
//!
//! // Against a bare pattern binary (no proxy): spawn, handshake, Initialize, Start.
//! let pattern = PatternProcess::spawn(
//!     "target/debug/trellis-memstore".as_ref(),
//!     "mem",
//!     serde_json::json!({ "max_keys": 100000 }),
//! )
//! .await?;
//! let kit = Kit::new(pattern.kv(), "conformance", "conformance-other");
//! let report = kv::run_all(&kit).await;
//! println!("{report}");
//! report.assert_all_passed();
//! # Ok(()) }
//! ```
//!
//! Every check is a `pub async fn(&Kit) -> Result<(), String>`, so a test
//! can also run one at a time. Checks write only keys under a prefix unique
//! to the [`Kit`] (`ck/<run>/<check>/…`), so they can run against a backend
//! that keeps data from earlier runs. Waiting (for a TTL to pass, say) is
//! bounded by [`Kit::patience`] and done by polling, never by fixed sleeps,
//! so the suite does not depend on the machine's speed.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::run_checks;
pub use super::{CheckResult, Outcome, Report};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trellis_proto::data::v1::key_value_client::KeyValueClient;
use trellis_proto::data::v1::{DeleteRequest, GetRequest, ListRequest, PutRequest};
use trellis_proto::pattern::v1::lifecycle_client::LifecycleClient;
use trellis_proto::pattern::v1::{
    InitializeRequest, InitializeResponse, StartRequest, StopRequest,
};

use crate::validate::{
    DEFAULT_PAGE_SIZE, MAX_KEY_BYTES, MAX_PAGE_SIZE, MAX_TTL_SECONDS, MAX_VALUE_BYTES,
};

/// Where the suite runs: a KeyValue client and two namespaces served by the
/// endpoint under test (the second one for the isolation check).
#[derive(Clone)]
pub struct Kit {
    kv: KeyValueClient<Channel>,
    namespace: String,
    other_namespace: String,
    run: String,
    patience: Duration,
}

impl Kit {
    /// A kit for `kv`; `namespace` and `other_namespace` must both be
    /// served by it (through the proxy: both routed to the pattern under
    /// test; directly against a pattern: any two names).
    pub fn new(
        kv: KeyValueClient<Channel>,
        namespace: impl Into<String>,
        other_namespace: impl Into<String>,
    ) -> Self {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let run = format!(
            "{}-{:x}-{}",
            std::process::id(),
            nanos,
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            kv,
            namespace: namespace.into(),
            other_namespace: other_namespace.into(),
            run,
            patience: Duration::from_secs(30),
        }
    }

    /// Connects to a KeyValue endpoint such as `http://127.0.0.1:8980`.
    pub async fn connect(
        addr: impl Into<String>,
        namespace: impl Into<String>,
        other_namespace: impl Into<String>,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = tonic::transport::Endpoint::from_shared(addr.into())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(Self::new(
            KeyValueClient::new(channel),
            namespace,
            other_namespace,
        ))
    }

    /// The upper bound on any wait (default 30 s). It only matters when
    /// something is broken.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// A client to make calls with.
    pub fn client(&self) -> KeyValueClient<Channel> {
        self.kv.clone()
    }

    /// The key prefix one check uses: `ck/<run>/<check>/`.
    pub fn prefix(&self, check: &str) -> String {
        format!("ck/{}/{check}/", self.run)
    }

    fn ns(&self) -> &str {
        &self.namespace
    }

    /// The namespace the checks write in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The bound on waits ([`Kit::patience`]).
    pub fn patience_left(&self) -> Duration {
        self.patience
    }

    async fn put(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), Status> {
        put_in(&mut self.client(), self.ns(), key, value, ttl).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, Status> {
        get_in(&mut self.client(), self.ns(), key).await
    }

    async fn delete(&self, key: &str) -> Result<bool, Status> {
        delete_in(&mut self.client(), self.ns(), key).await
    }

    /// Every page of `prefix` with `page_size`, as (key, value) pairs.
    async fn list_all(
        &self,
        namespace: &str,
        prefix: &str,
        page_size: i32,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut all = Vec::new();
        let mut token = String::new();
        let deadline = Instant::now() + self.patience;
        loop {
            let page = self
                .client()
                .list(ListRequest {
                    namespace: namespace.into(),
                    prefix: prefix.into(),
                    page_size,
                    page_token: token.clone(),
                })
                .await
                .map_err(|s| format!("List(prefix {prefix:?}) failed: {}", show(&s)))?
                .into_inner();
            if page_size > 0 && page.entries.len() > page_size as usize {
                return Err(format!(
                    "List returned {} entries for page_size {page_size}",
                    page.entries.len()
                ));
            }
            all.extend(page.entries.into_iter().map(|e| (e.key, e.value)));
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            if page.next_page_token == token {
                return Err("List returned the same page token twice".into());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "List kept returning page tokens for {:?}",
                    self.patience
                ));
            }
            token = page.next_page_token;
        }
    }
}

async fn put_in(
    kv: &mut KeyValueClient<Channel>,
    namespace: &str,
    key: &str,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<(), Status> {
    kv.put(PutRequest {
        namespace: namespace.into(),
        key: key.into(),
        value: value.to_vec(),
        ttl: ttl.and_then(|t| prost_types::Duration::try_from(t).ok()),
    })
    .await
    .map(|_| ())
}

async fn get_in(
    kv: &mut KeyValueClient<Channel>,
    namespace: &str,
    key: &str,
) -> Result<Vec<u8>, Status> {
    kv.get(GetRequest {
        namespace: namespace.into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().value)
}

async fn delete_in(
    kv: &mut KeyValueClient<Channel>,
    namespace: &str,
    key: &str,
) -> Result<bool, Status> {
    kv.delete(DeleteRequest {
        namespace: namespace.into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().deleted)
}

fn show(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// `Ok` if `result` is a success; the failure says which call failed.
fn ok<T>(what: &str, result: Result<T, Status>) -> Result<T, String> {
    result.map_err(|s| format!("{what} failed: {}", show(&s)))
}

fn expect_value(what: &str, got: Result<Vec<u8>, Status>, want: &[u8]) -> CheckResult {
    let got = ok(what, got)?;
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: want {}, got {}",
            preview(want),
            preview(&got)
        ))
    }
}

fn expect_code<T: fmt::Debug>(what: &str, got: Result<T, Status>, want: Code) -> CheckResult {
    match got {
        Err(s) if s.code() == want => Ok(()),
        Err(s) => Err(format!("{what}: want {want:?}, got {}", show(&s))),
        Ok(v) => Err(format!("{what}: want {want:?}, got success {v:?}")),
    }
}

/// The answer the contract gives a request that breaks a limit
/// (`docs/pattern-protocol.md`, "Validation a pattern owns"):
/// INVALID_ARGUMENT with a message that names `field`.
fn expect_invalid<T: fmt::Debug>(what: &str, got: Result<T, Status>, field: &str) -> CheckResult {
    match got {
        Err(s) if s.code() == Code::InvalidArgument && s.message().contains(field) => Ok(()),
        Err(s) if s.code() == Code::InvalidArgument => Err(format!(
            "{what}: want InvalidArgument naming the field {field:?} in its message, got {}",
            show(&s)
        )),
        Err(s) => Err(format!(
            "{what}: want InvalidArgument naming {field:?}, got {}",
            show(&s)
        )),
        Ok(v) => Err(format!(
            "{what}: want InvalidArgument naming {field:?}, got success {v:?}"
        )),
    }
}

/// A `List` of one page, as the client sent it.
async fn list_page(
    kit: &Kit,
    prefix: &str,
    page_size: i32,
    page_token: &str,
) -> Result<trellis_proto::data::v1::ListResponse, Status> {
    kit.client()
        .list(ListRequest {
            namespace: kit.ns().into(),
            prefix: prefix.into(),
            page_size,
            page_token: page_token.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// A `Put` with a TTL of `seconds` and `nanos`, sent as is (negative or
/// out of range included).
async fn put_with_raw_ttl(kit: &Kit, key: &str, seconds: i64, nanos: i32) -> Result<(), Status> {
    kit.client()
        .put(PutRequest {
            namespace: kit.ns().into(),
            key: key.into(),
            value: b"v".to_vec(),
            ttl: Some(prost_types::Duration { seconds, nanos }),
        })
        .await
        .map(|_| ())
}

fn preview(bytes: &[u8]) -> String {
    if bytes.len() <= 32 {
        format!("{bytes:?}")
    } else {
        format!("{} bytes starting {:?}", bytes.len(), &bytes[..16])
    }
}

/// Polls `probe` until it gives `Some`, for at most `patience`.
async fn poll_until<T, F, Fut>(patience: Duration, what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("gave up after {patience:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// The checks -------------------------------------------------------------

/// A value put is the value got.
pub async fn round_trip(kit: &Kit) -> CheckResult {
    let key = format!("{}greeting", kit.prefix("round_trip"));
    ok("Put", kit.put(&key, b"hello", None).await)?;
    expect_value("Get after Put", kit.get(&key).await, b"hello")
}

/// A second put replaces the first value.
pub async fn overwrite(kit: &Kit) -> CheckResult {
    let key = format!("{}k", kit.prefix("overwrite"));
    ok("first Put", kit.put(&key, b"one", None).await)?;
    ok("second Put", kit.put(&key, b"two, longer", None).await)?;
    expect_value("Get after overwrite", kit.get(&key).await, b"two, longer")?;
    ok("third Put", kit.put(&key, b"3", None).await)?;
    expect_value("Get after a shorter overwrite", kit.get(&key).await, b"3")
}

/// Values are bytes: every byte value, NULs, and invalid UTF-8 survive.
pub async fn binary_values(kit: &Kit) -> CheckResult {
    let p = kit.prefix("binary_values");
    let every_byte: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let cases: [(&str, &[u8]); 4] = [
        ("every-byte", &every_byte),
        ("nuls", b"\0\0a\0"),
        ("not-utf8", &[0xff, 0xfe, 0xc3, 0x28]),
        ("crlf", b"line\r\nline\n"),
    ];
    for (name, value) in cases {
        let key = format!("{p}{name}");
        ok(&format!("Put {name}"), kit.put(&key, value, None).await)?;
        expect_value(&format!("Get {name}"), kit.get(&key).await, value)?;
    }
    Ok(())
}

/// An empty value is a value, not a missing key.
pub async fn empty_value(kit: &Kit) -> CheckResult {
    let key = format!("{}empty", kit.prefix("empty_value"));
    ok("Put of an empty value", kit.put(&key, b"", None).await)?;
    expect_value(
        "Get of an empty value (must not be NOT_FOUND)",
        kit.get(&key).await,
        b"",
    )?;
    let listed = kit
        .list_all(kit.ns(), &kit.prefix("empty_value"), 0)
        .await?;
    if listed != [(key.clone(), Vec::new())] {
        return Err(format!(
            "List should show the empty value once, got {listed:?}"
        ));
    }
    Ok(())
}

/// A value of exactly [`MAX_VALUE_BYTES`] (1 MiB) round-trips; one byte
/// more is INVALID_ARGUMENT naming `value`, and the old value stays.
pub async fn large_value(kit: &Kit) -> CheckResult {
    let key = format!("{}big", kit.prefix("large_value"));
    let value: Vec<u8> = (0..MAX_VALUE_BYTES).map(|i| (i % 251) as u8).collect();
    ok("Put of a 1 MiB value", kit.put(&key, &value, None).await)?;
    expect_value("Get of a 1 MiB value", kit.get(&key).await, &value)?;
    // 1 MiB + 1 byte fits one gRPC message (4 MiB), so the limit is
    // reachable through the proxy and directly.
    let too_big = vec![7u8; MAX_VALUE_BYTES + 1];
    expect_invalid(
        "Put of 1 MiB + 1 byte",
        kit.put(&key, &too_big, None).await,
        "value",
    )?;
    expect_value(
        "Get after the rejected Put (the old value stays)",
        kit.get(&key).await,
        &value,
    )
}

/// A List over values of the largest size asked for in pages bigger than
/// one gRPC message holds: the pattern ends each page at
/// [`MAX_PAGE_BYTES`](crate::validate::MAX_PAGE_BYTES), and paging still returns every key once.
pub async fn list_large_values(kit: &Kit) -> CheckResult {
    const KEYS: usize = 5;
    let prefix = kit.prefix("list_large_values");
    let value = |i: usize| -> Vec<u8> { vec![b'a' + i as u8; MAX_VALUE_BYTES] };
    for i in 0..KEYS {
        ok(
            &format!("Put of 1 MiB value #{i}"),
            kit.put(&format!("{prefix}{i}"), &value(i), None).await,
        )?;
    }
    // page_size 10 over 5 MiB: a page that ignored MAX_PAGE_BYTES would not
    // fit a 4 MiB message and the List would fail.
    let all = kit.list_all(kit.ns(), &prefix, 10).await?;
    let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    let want: Vec<String> = (0..KEYS).map(|i| format!("{prefix}{i}")).collect();
    if keys != want {
        return Err(format!(
            "List of 5 × 1 MiB values returned keys {keys:?}, want {want:?}"
        ));
    }
    for (i, (key, got)) in all.iter().enumerate() {
        if *got != value(i) {
            return Err(format!(
                "List returned a different value for {key:?} ({} bytes, starting {})",
                got.len(),
                preview(got)
            ));
        }
    }
    Ok(())
}

/// A key with a TTL is readable before it expires and gone (Get, List,
/// Delete) after; a put without TTL clears an earlier TTL.
pub async fn ttl_expiry(kit: &Kit) -> CheckResult {
    let p = kit.prefix("ttl_expiry");
    let short = Duration::from_millis(700);
    let long = Duration::from_millis(1500);
    let kept = format!("{p}kept");
    let expiring = format!("{p}expiring");

    // `kept` gets the short TTL, then is overwritten without one.
    ok("Put kept (ttl)", kit.put(&kept, b"k", Some(short)).await)?;
    ok("Put kept again (no ttl)", kit.put(&kept, b"k2", None).await)?;

    let sent = Instant::now();
    ok(
        "Put expiring (ttl)",
        kit.put(&expiring, b"soon gone", Some(long)).await,
    )?;
    let got = kit.get(&expiring).await;
    // Only meaningful if the Get answered before the TTL could have run out.
    if sent.elapsed() < long {
        expect_value("Get before the TTL passed", got, b"soon gone")?;
    }

    let patience = kit.patience + long;
    poll_until(patience, "the key with a TTL to expire", || async {
        match kit.get(&expiring).await {
            Ok(_) => Ok(None),
            Err(s) if s.code() == Code::NotFound => {
                // Expired before its TTL was up, counted from before the Put.
                let answered = sent.elapsed();
                if answered + Duration::from_millis(10) < long {
                    return Err(format!(
                        "the key expired {answered:?} after its Put, before its ttl of {long:?}"
                    ));
                }
                Ok(Some(()))
            }
            Err(s) => Err(format!("Get while waiting for expiry failed: {}", show(&s))),
        }
    })
    .await?;

    let listed = kit.list_all(kit.ns(), &p, 0).await?;
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    if keys != [kept.as_str()] {
        return Err(format!(
            "after expiry List should show only {kept:?}, got {keys:?}"
        ));
    }
    match ok("Delete of an expired key", kit.delete(&expiring).await)? {
        false => {}
        true => return Err("Delete of an expired key said deleted=true".into()),
    }
    // `kept`'s old TTL (shorter than `expiring`'s, set earlier) has passed.
    expect_value(
        "Get of a key whose TTL was cleared by a Put without one",
        kit.get(&kept).await,
        b"k2",
    )
}

/// Delete removes a key and says so once; deleting again, or a key that
/// never existed, succeeds with deleted=false.
pub async fn delete_idempotence(kit: &Kit) -> CheckResult {
    let p = kit.prefix("delete_idempotence");
    let key = format!("{p}k");
    ok("Put", kit.put(&key, b"v", None).await)?;
    if !ok("first Delete", kit.delete(&key).await)? {
        return Err("first Delete of a live key said deleted=false".into());
    }
    expect_code("Get after Delete", kit.get(&key).await, Code::NotFound)?;
    if ok("second Delete", kit.delete(&key).await)? {
        return Err("second Delete said deleted=true".into());
    }
    if ok(
        "Delete of a key never set",
        kit.delete(&format!("{p}never")).await,
    )? {
        return Err("Delete of a key never set said deleted=true".into());
    }
    ok("Put after Delete", kit.put(&key, b"again", None).await)?;
    expect_value("Get after re-Put", kit.get(&key).await, b"again")
}

/// A key never set is NOT_FOUND (not an empty value, not another code).
pub async fn not_found(kit: &Kit) -> CheckResult {
    let key = format!("{}missing", kit.prefix("not_found"));
    expect_code(
        "Get of a key never set",
        kit.get(&key).await,
        Code::NotFound,
    )
}

/// List returns exactly the keys with the prefix, in ascending byte order,
/// across pages, with their values; special characters in the prefix are
/// taken literally (no LIKE or glob wildcards).
pub async fn list_order_and_pagination(kit: &Kit) -> CheckResult {
    let base = kit.prefix("list_order");
    // Characters that mean something to LIKE, glob patterns and regexes.
    let prefix = format!("{base}p%_*?[\\]^");
    let suffixes = [
        "a", "B", "a/b", "a0", "~", "é", "日本", "z", "Z", "_", "%", "a b", "aa", "ab", "b",
    ];
    let mut want: Vec<String> = suffixes.iter().map(|s| format!("{prefix}{s}")).collect();
    for i in 0..12 {
        want.push(format!("{prefix}n{i:02}"));
    }
    // Decoys that an unescaped pattern, a case-insensitive or a
    // locale-aware comparison would let in.
    let decoys = [
        format!("{base}pX_*?[\\]^a"),
        format!("{base}p%X*?[\\]^a"),
        format!("{base}p%_*?[\\]"),
        format!("{base}P%_*?[\\]^a"),
        format!("{base}p%_*?[\\]_a"),
    ];
    // Insert in a scrambled order.
    let n = want.len();
    for i in 0..n {
        let key = &want[(i * 7 + 3) % n];
        ok(
            &format!("Put {key:?}"),
            kit.put(key, key.as_bytes(), None).await,
        )?;
    }
    for d in &decoys {
        ok(
            &format!("Put decoy {d:?}"),
            kit.put(d, b"decoy", None).await,
        )?;
    }
    want.sort(); // Rust orders strings by their UTF-8 bytes.

    for page_size in [1, 4, 7, 0, 1000] {
        let got = kit.list_all(kit.ns(), &prefix, page_size).await?;
        let keys: Vec<&String> = got.iter().map(|(k, _)| k).collect();
        if keys != want.iter().collect::<Vec<_>>() {
            return Err(format!(
                "List(prefix {prefix:?}, page_size {page_size}): want {want:?} (ascending \
                 byte order), got {keys:?}"
            ));
        }
        if let Some((k, v)) = got.iter().find(|(k, v)| v != k.as_bytes()) {
            return Err(format!("List gave {k:?} the value {}", preview(v)));
        }
    }
    // A page token is opaque: one the pattern did not make is rejected.
    let bad = kit
        .client()
        .list(ListRequest {
            namespace: kit.ns().into(),
            prefix: prefix.clone(),
            page_size: 2,
            page_token: "definitely not a token!".into(),
        })
        .await;
    expect_code("List with a made-up page token", bad, Code::InvalidArgument)?;
    // No match: an empty page without a token.
    let none = kit
        .list_all(kit.ns(), &format!("{base}nothing-here"), 0)
        .await?;
    if !none.is_empty() {
        return Err(format!("List of an unused prefix returned {none:?}"));
    }
    Ok(())
}

/// Paging through a prefix while keys are added to it concurrently: keys
/// present throughout are each returned exactly once, nothing twice, and
/// the order stays ascending.
pub async fn list_concurrent_adds(kit: &Kit) -> CheckResult {
    let prefix = kit.prefix("list_concurrent");
    let initial: Vec<String> = (0..120)
        .step_by(2)
        .map(|i| format!("{prefix}{i:04}"))
        .collect();
    for key in &initial {
        ok("Put", kit.put(key, b"initial", None).await)?;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let kit = kit.clone();
        let prefix = prefix.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            // Odd keys, spread over the range being listed, plus keys after it.
            let mut added = 0usize;
            for i in (1..240).step_by(2) {
                if stop.load(Ordering::Relaxed) && i > 120 {
                    break;
                }
                let key = format!("{prefix}{i:04}");
                kit.put(&key, b"added", None).await?;
                added += 1;
                tokio::task::yield_now().await;
            }
            Ok::<usize, Status>(added)
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut token = String::new();
    let deadline = Instant::now() + kit.patience;
    loop {
        let page = ok(
            "List page",
            kit.client()
                .list(ListRequest {
                    namespace: kit.ns().into(),
                    prefix: prefix.clone(),
                    page_size: 5,
                    page_token: token.clone(),
                })
                .await,
        )?
        .into_inner();
        seen.extend(page.entries.into_iter().map(|e| e.key));
        if page.next_page_token.is_empty() || Instant::now() > deadline {
            break;
        }
        token = page.next_page_token;
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    match writer.await {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => return Err(format!("concurrent Put failed: {}", show(&s))),
        Err(e) => return Err(format!("the writer task failed: {e}")),
    }
    if let Some(w) = seen.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!(
            "List pages were not strictly ascending: {:?} came before {:?}",
            w[0], w[1]
        ));
    }
    let seen_set: BTreeSet<&String> = seen.iter().collect();
    let missing: Vec<&String> = initial.iter().filter(|k| !seen_set.contains(k)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "keys present for the whole listing were skipped: {missing:?}"
        ));
    }
    Ok(())
}

/// Many writers racing on one key: the final value is one of the values
/// written, whole (never a mix).
pub async fn concurrent_writers(kit: &Kit) -> CheckResult {
    let key = format!("{}contended", kit.prefix("concurrent_writers"));
    let writers = 8u8;
    let rounds = 10;
    let value_of = |w: u8, r: u8| -> Vec<u8> {
        let mut v = vec![w; 32 * 1024];
        v[0] = r;
        v
    };
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let kit = kit.clone();
        let key = key.clone();
        tasks.spawn(async move {
            for r in 0..rounds {
                kit.put(&key, &value_of(w, r), None).await?;
            }
            Ok::<(), Status>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(s)) => return Err(format!("a concurrent Put failed: {}", show(&s))),
            Err(e) => return Err(format!("a writer task failed: {e}")),
        }
    }
    let got = ok("Get after the race", kit.get(&key).await)?;
    let written: HashSet<Vec<u8>> = (0..writers)
        .flat_map(|w| (0..rounds).map(move |r| (w, r)))
        .map(|(w, r)| value_of(w, r))
        .collect();
    if written.contains(&got) {
        Ok(())
    } else {
        Err(format!(
            "the value after concurrent Puts is none of the values written: {}",
            preview(&got)
        ))
    }
}

/// The same key in two namespaces is two keys: values, deletes and lists do
/// not cross.
pub async fn namespace_isolation(kit: &Kit) -> CheckResult {
    let (a, b) = (kit.namespace.as_str(), kit.other_namespace.as_str());
    if a == b {
        return Err(format!(
            "the kit needs two different namespaces served by the endpoint; both are {a:?}"
        ));
    }
    let prefix = kit.prefix("namespace_isolation");
    let key = format!("{prefix}shared");
    let mut kv = kit.client();
    ok(
        &format!("Put in {a:?}"),
        put_in(&mut kv, a, &key, b"in a", None).await,
    )?;
    ok(
        &format!("Put in {b:?}"),
        put_in(&mut kv, b, &key, b"in b", None).await,
    )?;
    expect_value(
        &format!("Get in {a:?}"),
        get_in(&mut kv, a, &key).await,
        b"in a",
    )?;
    expect_value(
        &format!("Get in {b:?}"),
        get_in(&mut kv, b, &key).await,
        b"in b",
    )?;
    let only_a = format!("{prefix}only-a");
    ok(
        "Put only in a",
        put_in(&mut kv, a, &only_a, b"x", None).await,
    )?;
    expect_code(
        &format!("Get in {b:?} of a key set only in {a:?}"),
        get_in(&mut kv, b, &only_a).await,
        Code::NotFound,
    )?;
    let listed = kit.list_all(b, &prefix, 0).await?;
    let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
    if keys != [key.as_str()] {
        return Err(format!(
            "List in {b:?} should show only its own key {key:?}, got {keys:?}"
        ));
    }
    if !ok(
        &format!("Delete in {a:?}"),
        delete_in(&mut kv, a, &key).await,
    )? {
        return Err(format!("Delete in {a:?} said deleted=false"));
    }
    expect_value(
        &format!("Get in {b:?} after a Delete in {a:?}"),
        get_in(&mut kv, b, &key).await,
        b"in b",
    )
}

// The validation a pattern owns ----------------------------------------------
//
// The proxy forwards data calls unchecked, so each pattern enforces the
// limits in `docs/pattern-protocol.md` ("Validation a pattern owns"), the
// same as `crate::validate`; these checks take the limits from its
// constants.

/// An empty key is INVALID_ARGUMENT naming `key` for Get, Put and Delete,
/// and the Put stores nothing.
pub async fn invalid_empty_key(kit: &Kit) -> CheckResult {
    expect_invalid(
        "Put with an empty key",
        kit.put("", b"v", None).await,
        "key",
    )?;
    expect_invalid("Get with an empty key", kit.get("").await, "key")?;
    expect_invalid("Delete with an empty key", kit.delete("").await, "key")
}

/// A key of [`MAX_KEY_BYTES`] bytes of UTF-8 round-trips; one byte more is
/// INVALID_ARGUMENT naming `key` for Get, Put and Delete. Bytes, not
/// characters, are counted.
pub async fn invalid_key_length(kit: &Kit) -> CheckResult {
    let p = kit.prefix("invalid_key_length");
    let longest = format!("{p}{}", "k".repeat(MAX_KEY_BYTES - p.len()));
    ok(
        &format!("Put of a {MAX_KEY_BYTES}-byte key"),
        kit.put(&longest, b"longest", None).await,
    )?;
    expect_value(
        &format!("Get of a {MAX_KEY_BYTES}-byte key"),
        kit.get(&longest).await,
        b"longest",
    )?;
    let too_long = format!("{longest}k");
    let what = |call: &str| format!("{call} with a key of {} bytes", MAX_KEY_BYTES + 1);
    expect_invalid(&what("Put"), kit.put(&too_long, b"v", None).await, "key")?;
    expect_invalid(&what("Get"), kit.get(&too_long).await, "key")?;
    expect_invalid(&what("Delete"), kit.delete(&too_long).await, "key")?;
    // 'é' is two bytes: fewer characters than the limit, more bytes.
    let wide = format!("{p}{}", "é".repeat((MAX_KEY_BYTES - p.len()) / 2 + 1));
    expect_invalid(
        &format!(
            "Put with a key of {} characters but {} bytes",
            wide.chars().count(),
            wide.len()
        ),
        kit.put(&wide, b"v", None).await,
        "key",
    )
}

/// A key containing NUL is INVALID_ARGUMENT naming `key`.
pub async fn invalid_key_nul(kit: &Kit) -> CheckResult {
    let key = format!("{}a\0b", kit.prefix("invalid_key_nul"));
    expect_invalid(
        "Put with a NUL in the key",
        kit.put(&key, b"v", None).await,
        "key",
    )?;
    expect_invalid("Get with a NUL in the key", kit.get(&key).await, "key")?;
    expect_invalid(
        "Delete with a NUL in the key",
        kit.delete(&key).await,
        "key",
    )
}

/// A negative `page_size` is INVALID_ARGUMENT naming `page_size`.
pub async fn invalid_page_size(kit: &Kit) -> CheckResult {
    let prefix = kit.prefix("invalid_page_size");
    for page_size in [-1, i32::MIN] {
        expect_invalid(
            &format!("List with page_size {page_size}"),
            list_page(kit, &prefix, page_size, "").await,
            "page_size",
        )?;
    }
    Ok(())
}

/// A `page_size` above [`MAX_PAGE_SIZE`] is not an error: the page holds
/// at most [`MAX_PAGE_SIZE`] entries; 0 means at most
/// [`DEFAULT_PAGE_SIZE`]; paging still returns every key once.
pub async fn page_size_bounds(kit: &Kit) -> CheckResult {
    const WRITERS: usize = 16;
    let prefix = kit.prefix("page_size_bounds");
    let keys: Vec<String> = (0..=MAX_PAGE_SIZE)
        .map(|i| format!("{prefix}{i:05}"))
        .collect();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let kit = kit.clone();
        let mine: Vec<String> = keys.iter().skip(w).step_by(WRITERS).cloned().collect();
        writers.spawn(async move {
            for key in mine {
                ok(&format!("Put {key:?}"), kit.put(&key, b"v", None).await)?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = writers.join_next().await {
        done.map_err(|e| format!("a writer task failed: {e}"))??;
    }
    for (page_size, most) in [
        (i32::MAX, MAX_PAGE_SIZE),
        (MAX_PAGE_SIZE as i32 + 1, MAX_PAGE_SIZE),
        (0, DEFAULT_PAGE_SIZE),
    ] {
        let page = ok(
            &format!("List of {} keys with page_size {page_size}", keys.len()),
            list_page(kit, &prefix, page_size, "").await,
        )?;
        if page.entries.len() > most {
            return Err(format!(
                "List with page_size {page_size} returned {} entries; want at most {most}",
                page.entries.len()
            ));
        }
        if page.entries.is_empty() || page.next_page_token.is_empty() {
            return Err(format!(
                "List with page_size {page_size} over {} keys returned {} entries and \
                 next_page_token {:?}; want a non-empty page and a token for the rest",
                keys.len(),
                page.entries.len(),
                page.next_page_token
            ));
        }
    }
    let all = kit.list_all(kit.ns(), &prefix, i32::MAX).await?;
    let listed: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    if listed != keys {
        return Err(format!(
            "paging with page_size {} returned {} keys, want the {} put, each once, in order",
            i32::MAX,
            listed.len(),
            keys.len()
        ));
    }
    Ok(())
}

/// A page token the pattern never returned is INVALID_ARGUMENT naming
/// `page_token`. (A token from another prefix is not checked: the
/// contract allows a pattern to accept it.)
pub async fn invalid_page_token(kit: &Kit) -> CheckResult {
    let prefix = kit.prefix("invalid_page_token");
    ok("Put", kit.put(&format!("{prefix}a"), b"v", None).await)?;
    for token in ["definitely not a token!", "{\"after\":", "\u{7f}\u{1}"] {
        expect_invalid(
            &format!("List with the made-up page_token {token:?}"),
            list_page(kit, &prefix, 1, token).await,
            "page_token",
        )?;
    }
    Ok(())
}

/// A negative TTL, or one over [`MAX_TTL_SECONDS`], is INVALID_ARGUMENT
/// naming `ttl` and stores nothing; a TTL of exactly [`MAX_TTL_SECONDS`]
/// is accepted.
pub async fn invalid_ttl(kit: &Kit) -> CheckResult {
    let p = kit.prefix("invalid_ttl");
    let key = format!("{p}k");
    for (seconds, nanos) in [(-1, 0), (0, -1), (i64::MIN, 0), (MAX_TTL_SECONDS + 1, 0)] {
        expect_invalid(
            &format!("Put with ttl {{ seconds: {seconds}, nanos: {nanos} }}"),
            put_with_raw_ttl(kit, &key, seconds, nanos).await,
            "ttl",
        )?;
    }
    expect_code(
        "Get after Puts rejected for their ttl (nothing stored)",
        kit.get(&key).await,
        Code::NotFound,
    )?;
    ok(
        &format!("Put with the longest ttl ({MAX_TTL_SECONDS}s)"),
        put_with_raw_ttl(kit, &key, MAX_TTL_SECONDS, 0).await,
    )?;
    expect_value(
        "Get of a key with the longest ttl",
        kit.get(&key).await,
        b"v",
    )
}

// Running them all ---------------------------------------------------------

/// The name and function of every check, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "round_trip",
    "overwrite",
    "binary_values",
    "empty_value",
    "large_value",
    "not_found",
    "delete_idempotence",
    "ttl_expiry",
    "list_order_and_pagination",
    "list_concurrent_adds",
    "list_large_values",
    "concurrent_writers",
    "namespace_isolation",
    "invalid_empty_key",
    "invalid_key_length",
    "invalid_key_nul",
    "invalid_page_size",
    "page_size_bounds",
    "invalid_page_token",
    "invalid_ttl",
];

/// Runs the check called `name` (one of [`CHECKS`]).
pub async fn run_one(kit: &Kit, name: &str) -> CheckResult {
    match name {
        "round_trip" => round_trip(kit).await,
        "overwrite" => overwrite(kit).await,
        "binary_values" => binary_values(kit).await,
        "empty_value" => empty_value(kit).await,
        "large_value" => large_value(kit).await,
        "not_found" => not_found(kit).await,
        "delete_idempotence" => delete_idempotence(kit).await,
        "ttl_expiry" => ttl_expiry(kit).await,
        "list_order_and_pagination" => list_order_and_pagination(kit).await,
        "list_concurrent_adds" => list_concurrent_adds(kit).await,
        "list_large_values" => list_large_values(kit).await,
        "concurrent_writers" => concurrent_writers(kit).await,
        "namespace_isolation" => namespace_isolation(kit).await,
        "invalid_empty_key" => invalid_empty_key(kit).await,
        "invalid_key_length" => invalid_key_length(kit).await,
        "invalid_key_nul" => invalid_key_nul(kit).await,
        "invalid_page_size" => invalid_page_size(kit).await,
        "page_size_bounds" => page_size_bounds(kit).await,
        "invalid_page_token" => invalid_page_token(kit).await,
        "invalid_ttl" => invalid_ttl(kit).await,
        other => Err(format!(
            "no check is called {other:?}; the checks are {CHECKS:?}"
        )),
    }
}

/// Runs every check in [`CHECKS`], one after another, and reports each.
/// A check that fails does not stop the others.
pub async fn run_all(kit: &Kit) -> Report {
    run_checks("kv", CHECKS, |name| run_one(kit, name)).await
}

// Running a bare pattern -----------------------------------------------------

/// A pattern binary started the way the proxy starts one — spawned with the
/// `TRELLIS_PATTERN_*` environment, handshake read from stdout, then
/// `Initialize` with a JSON config, `Start`, and a first `SERVING` health
/// check — so the kit can run without the proxy. Killed when dropped.
pub struct PatternProcess {
    child: Child,
    channel: Channel,
    stderr: Arc<Mutex<Vec<String>>>,
    initialized: InitializeResponse,
    addr: String,
}

/// How many stderr lines [`PatternProcess`] keeps for error messages.
const STDERR_TAIL: usize = 200;

impl PatternProcess {
    /// Spawns `binary` as pattern `name`, initializes it with `config` (the
    /// pattern's `config:` block as JSON) and starts it. Each step is bounded
    /// (30 s); a failure says which step and quotes the pattern's stderr.
    pub async fn spawn(
        binary: &Path,
        name: &str,
        config: serde_json::Value,
    ) -> Result<Self, String> {
        Self::spawn_with_patience(binary, name, config, Duration::from_secs(30)).await
    }

    /// [`PatternProcess::spawn`] with another bound on each step.
    pub async fn spawn_with_patience(
        binary: &Path,
        name: &str,
        config: serde_json::Value,
        patience: Duration,
    ) -> Result<Self, String> {
        Self::spawn_command(binary, &[], name, config, patience).await
    }

    /// [`PatternProcess::spawn_with_patience`] with arguments for the
    /// command (a pattern entry's `args:`).
    pub async fn spawn_command(
        binary: &Path,
        args: &[String],
        name: &str,
        config: serde_json::Value,
        patience: Duration,
    ) -> Result<Self, String> {
        use trellis_proto::protocol::{VERSION, env as var};
        let mut child = Command::new(binary)
            .args(args)
            .env(var::PROTOCOL, VERSION.to_string())
            .env(var::NAME, name)
            .env(var::LISTEN, "127.0.0.1:0")
            .env(var::LOG_FORMAT, "text")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "cannot spawn {}: no such file (or its `#!` interpreter is missing); give \
                     the path of the pattern's executable, or a command on PATH",
                    binary.display()
                ),
                std::io::ErrorKind::PermissionDenied => format!(
                    "cannot spawn {}: permission denied; is it an executable file (chmod +x)?",
                    binary.display()
                ),
                _ => format!("cannot spawn {}: {e}", binary.display()),
            })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut tail = sink.lock().unwrap_or_else(|p| p.into_inner());
                    if tail.len() == STDERR_TAIL {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            });
        }
        let mut process = Self {
            child,
            // Replaced once the handshake names the address.
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            stderr,
            initialized: InitializeResponse::default(),
            addr: String::new(),
        };
        let addr = process.handshake(patience).await?;
        process.addr.clone_from(&addr);
        process.channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| process.failed(&format!("bad handshake address {addr:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(patience)
            .connect()
            .await
            .map_err(|e| process.failed(&format!("cannot connect to {addr}: {e}")))?;
        process.initialized = process.initialize_and_start(name, config, patience).await?;
        Ok(process)
    }

    async fn handshake(&mut self, patience: Duration) -> Result<String, String> {
        let Some(stdout) = self.child.stdout.take() else {
            return Err("the pattern's stdout was not piped".into());
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        match tokio::time::timeout(patience, stdout.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return Err(self.failed("the pattern exited before its handshake line")),
            Ok(Err(e)) => return Err(self.failed(&format!("reading the handshake: {e}"))),
            Err(_) => {
                return Err(self.failed(&format!("no handshake line within {patience:?}")));
            }
        }
        // Keep draining stdout so the pattern never blocks on it.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink).await;
        });
        use trellis_proto::protocol::{Endpoint, parse_handshake};
        match parse_handshake(&line) {
            Ok(Endpoint::Tcp(addr)) => Ok(addr.to_string()),
            Ok(Endpoint::Unix(path)) => Err(self.failed(&format!(
                "the pattern listens on the unix socket {}; the kit asked for tcp \
                 (TRELLIS_PATTERN_LISTEN=127.0.0.1:0)",
                path.display()
            ))),
            Err(e) => Err(self.failed(&e.to_string())),
        }
    }

    async fn initialize_and_start(
        &self,
        name: &str,
        config: serde_json::Value,
        patience: Duration,
    ) -> Result<InitializeResponse, String> {
        let mut lifecycle = LifecycleClient::new(self.channel.clone());
        let config = match config {
            serde_json::Value::Object(_) | serde_json::Value::Null => {
                trellis_proto::json::to_struct(&config)
            }
            other => return Err(format!("the config must be a JSON object, got {other}")),
        };
        let init = InitializeRequest {
            name: name.into(),
            config: Some(config),
            protocol_version: trellis_proto::PATTERN_PROTOCOL_VERSION,
        };
        let initialized = match tokio::time::timeout(patience, lifecycle.initialize(init)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(s)) => return Err(self.failed(&format!("Initialize failed: {}", show(&s)))),
            Err(_) => return Err(self.failed(&format!("Initialize took over {patience:?}"))),
        };
        match tokio::time::timeout(patience, lifecycle.start(StartRequest {})).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => return Err(self.failed(&format!("Start failed: {}", show(&s)))),
            Err(_) => return Err(self.failed(&format!("Start took over {patience:?}"))),
        }
        let health = HealthClient::new(self.channel.clone());
        poll_until(patience, "the pattern to report SERVING", || {
            let mut health = health.clone();
            async move {
                let req = HealthCheckRequest {
                    service: String::new(),
                };
                Ok(match health.check(req).await {
                    Ok(r) if r.get_ref().status() == ServingStatus::Serving => Some(()),
                    _ => None,
                })
            }
        })
        .await
        .map_err(|e| self.failed(&e))?;
        Ok(initialized)
    }

    fn failed(&self, what: &str) -> String {
        format!(
            "{what}; the pattern's stderr:\n{}",
            self.stderr_tail().join("\n")
        )
    }

    /// What the pattern answered to `Initialize`: its implementation name,
    /// version and the data services it implements (`interfaces`).
    pub fn initialized(&self) -> &InitializeResponse {
        &self.initialized
    }

    /// The address from its handshake line, `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The channel to the pattern (for Health, Lifecycle or data clients).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A KeyValue client for the pattern.
    pub fn kv(&self) -> KeyValueClient<Channel> {
        KeyValueClient::new(self.channel.clone())
    }

    /// The pattern's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The last lines the pattern wrote to stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Lifecycle/Stop`, then waits for the exit (killing it after
    /// `grace` + 5 s). Returns whether it exited with status 0.
    pub async fn stop(mut self, grace: Duration) -> Result<bool, String> {
        let req = StopRequest {
            grace: prost_types::Duration::try_from(grace).ok(),
        };
        // One bound for both: a Stop that never answers must not hang us.
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(5);
        let mut lifecycle = LifecycleClient::new(self.channel.clone());
        let _ = tokio::time::timeout_at(deadline, lifecycle.stop(req)).await;
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(Ok(status)) => Ok(status.success()),
            Ok(Err(e)) => Err(format!("waiting for the pattern: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(self.failed("the pattern did not exit after Stop"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_has_a_name_that_runs() {
        let mut names: Vec<&str> = CHECKS.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len());
    }

    #[test]
    fn report_counts_and_lists_failures() {
        let report = Report {
            suite: "kv",
            outcomes: vec![
                Outcome {
                    name: "round_trip",
                    result: Ok(()),
                    elapsed: Duration::from_millis(2),
                },
                Outcome {
                    name: "not_found",
                    result: Err("want NotFound, got Ok".into()),
                    elapsed: Duration::from_millis(1),
                },
            ],
        };
        assert!(!report.all_passed());
        let text = report.to_string();
        assert!(text.contains("1 passed, 1 failed"), "{text}");
        assert!(text.contains("FAIL  not_found"), "{text}");
        assert!(text.contains("want NotFound"), "{text}");
    }

    #[tokio::test]
    async fn unknown_check_names_the_known_ones() {
        let kit = Kit::new(
            KeyValueClient::new(
                tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            ),
            "a",
            "b",
        );
        let err = run_one(&kit, "nope").await.unwrap_err();
        assert!(err.contains("round_trip"), "{err}");
    }

    #[tokio::test]
    async fn spawn_of_a_missing_binary_says_so() {
        let err = PatternProcess::spawn(
            Path::new("/nonexistent/trellis-x"),
            "x",
            serde_json::Value::Null,
        )
        .await
        .err()
        .unwrap_or_default();
        assert!(err.contains("/nonexistent/trellis-x"), "{err}");
    }
}
