//! The idempotency suite (docs/idempotency.md): a key-value pattern that
//! honours idempotency keys runs a keyed write once, replays its answer to
//! a repeat (marked `idempotent-replayed: true`) without writing again,
//! refuses the key for another request, runs ten simultaneous duplicates
//! once, and forgets the key after the retention.
//!
//! It runs on the key-value [`Kit`]. Each keyed call sends
//! `trellis-idempotency-retention-ms` = [`RETENTION`]: a bare pattern
//! takes it; the proxy replaces it with the namespace policy's
//! `idempotency.retention`, so run the suite through a proxy whose policy
//! says `idempotency: {retention: 2s}`. A pattern that does not support
//! keys fails every check with its FAILED_PRECONDITION answer.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};
use trellis_proto::data::v1::{DeleteRequest, GetRequest, PutRequest};
use trellis_proto::idempotency::{KEY, REPLAYED, RETENTION_MS};

use super::kv::Kit;
use super::{CheckResult, Report, run_checks};

/// The retention the suite asks for (and expects through a proxy).
pub const RETENTION: Duration = Duration::from_secs(2);

fn keyed<T>(message: T, key: &str) -> Request<T> {
    let mut req = Request::new(message);
    if let Ok(v) = MetadataValue::try_from(key) {
        req.metadata_mut().insert(KEY, v);
    }
    req.metadata_mut().insert(
        RETENTION_MS,
        MetadataValue::from(RETENTION.as_millis() as u64),
    );
    req
}

fn replayed<T>(r: &Response<T>) -> bool {
    r.metadata().get(REPLAYED).is_some_and(|v| v == "true")
}

fn show(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn put(kit: &Kit, key: &str, value: &[u8]) -> PutRequest {
    PutRequest {
        namespace: kit.namespace().into(),
        key: key.into(),
        value: value.to_vec(),
        ttl: None,
    }
}

/// A unique idempotency key for one check of this kit's run.
fn idem(kit: &Kit, check: &str) -> String {
    format!("{}idem", kit.prefix(check))
}

/// A repeated keyed Put is a replay and does not write again.
pub async fn put_replays(kit: &Kit) -> CheckResult {
    let key = format!("{}k", kit.prefix("put_replays"));
    let id = idem(kit, "put_replays");
    let mut kv = kit.client();
    let first = kv
        .put(keyed(put(kit, &key, b"first"), &id))
        .await
        .map_err(|s| format!("the first keyed Put failed: {}", show(&s)))?;
    if replayed(&first) {
        return Err("the first keyed Put was marked replayed".into());
    }
    kv.put(put(kit, &key, b"between"))
        .await
        .map_err(|s| format!("the Put without a key failed: {}", show(&s)))?;
    let again = kv
        .put(keyed(put(kit, &key, b"first"), &id))
        .await
        .map_err(|s| format!("the repeated keyed Put failed: {}", show(&s)))?;
    if !replayed(&again) {
        return Err(format!("the repeated keyed Put lacks `{REPLAYED}: true`"));
    }
    let got = kv
        .get(GetRequest {
            namespace: kit.namespace().into(),
            key: key.clone(),
        })
        .await
        .map_err(|s| format!("Get failed: {}", show(&s)))?
        .into_inner()
        .value;
    if got != b"between" {
        return Err(format!(
            "the replay wrote again: the value is {:?}, not the one written in between",
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(())
}

/// A repeated keyed Delete answers `deleted: true` as the first one did.
pub async fn delete_replays(kit: &Kit) -> CheckResult {
    let key = format!("{}k", kit.prefix("delete_replays"));
    let id = idem(kit, "delete_replays");
    let mut kv = kit.client();
    kv.put(put(kit, &key, b"v"))
        .await
        .map_err(|s| format!("Put failed: {}", show(&s)))?;
    let delete = || DeleteRequest {
        namespace: kit.namespace().into(),
        key: key.clone(),
    };
    let first = kv
        .delete(keyed(delete(), &id))
        .await
        .map_err(|s| format!("the keyed Delete failed: {}", show(&s)))?;
    let again = kv
        .delete(keyed(delete(), &id))
        .await
        .map_err(|s| format!("the repeated keyed Delete failed: {}", show(&s)))?;
    match (
        first.get_ref().deleted,
        again.get_ref().deleted,
        replayed(&again),
    ) {
        (true, true, true) => Ok(()),
        (f, a, r) => Err(format!(
            "want deleted true, then true replayed; got {f}, then {a} (replayed: {r})"
        )),
    }
}

/// The key with another request is INVALID_ARGUMENT `IDEMPOTENCY_KEY_REUSED`.
pub async fn reuse_is_refused(kit: &Kit) -> CheckResult {
    let key = format!("{}k", kit.prefix("reuse_is_refused"));
    let id = idem(kit, "reuse_is_refused");
    let mut kv = kit.client();
    kv.put(keyed(put(kit, &key, b"one"), &id))
        .await
        .map_err(|s| format!("the keyed Put failed: {}", show(&s)))?;
    match kv.put(keyed(put(kit, &key, b"two"), &id)).await {
        Err(s) if s.code() == Code::InvalidArgument && reason(&s) == "IDEMPOTENCY_KEY_REUSED" => {
            Ok(())
        }
        Err(s) => Err(format!(
            "want INVALID_ARGUMENT IDEMPOTENCY_KEY_REUSED, got {} (reason {:?})",
            show(&s),
            reason(&s)
        )),
        Ok(_) => Err("the key was accepted for a different request".into()),
    }
}

fn reason(s: &Status) -> String {
    use tonic_types::StatusExt;
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// Ten identical keyed Deletes at once: one runs; each answer is its
/// answer (`deleted: true`), or IDEMPOTENCY_KEY_IN_USE for a backend that
/// claims before it writes.
pub async fn concurrent_duplicates_run_once(kit: &Kit) -> CheckResult {
    let key = format!("{}k", kit.prefix("concurrent_duplicates"));
    let id = idem(kit, "concurrent_duplicates");
    kit.client()
        .put(put(kit, &key, b"v"))
        .await
        .map_err(|s| format!("Put failed: {}", show(&s)))?;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let mut kv = kit.client();
        let req = keyed(
            DeleteRequest {
                namespace: kit.namespace().into(),
                key: key.clone(),
            },
            &id,
        );
        calls.spawn(async move { kv.delete(req).await });
    }
    let (mut executed, mut in_use) = (0, 0);
    while let Some(done) = calls.join_next().await {
        match done.map_err(|e| format!("a call task failed: {e}"))? {
            Ok(r) if !r.get_ref().deleted => {
                return Err(
                    "a duplicate answered deleted: false: the Delete ran more than once".into(),
                );
            }
            Ok(r) => executed += usize::from(!replayed(&r)),
            Err(s) if s.code() == Code::Aborted && reason(&s) == "IDEMPOTENCY_KEY_IN_USE" => {
                in_use += 1;
            }
            Err(s) => return Err(format!("a duplicate failed: {}", show(&s))),
        }
    }
    if executed != 1 {
        return Err(format!(
            "{executed} of 10 duplicates ran (not replayed; {in_use} in use); want exactly 1"
        ));
    }
    Ok(())
}

/// After the retention the key is free: the other request runs.
pub async fn records_expire(kit: &Kit) -> CheckResult {
    let key = format!("{}k", kit.prefix("records_expire"));
    let id = idem(kit, "records_expire");
    let mut kv = kit.client();
    kv.put(keyed(put(kit, &key, b"one"), &id))
        .await
        .map_err(|s| format!("the keyed Put failed: {}", show(&s)))?;
    let started = Instant::now();
    loop {
        match kv.put(keyed(put(kit, &key, b"two"), &id)).await {
            Ok(r) if !replayed(&r) => return Ok(()),
            Ok(_) => return Err("a different request was replayed".into()),
            Err(s) if reason(&s) == "IDEMPOTENCY_KEY_REUSED" => {}
            Err(s) => return Err(format!("the Put after the retention failed: {}", show(&s))),
        }
        if started.elapsed() > kit.patience_left() + RETENTION {
            return Err(format!(
                "the key was still held {:?} after a {RETENTION:?} retention",
                started.elapsed()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The checks, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "put_replays",
    "delete_replays",
    "reuse_is_refused",
    "concurrent_duplicates_run_once",
    "records_expire",
];

/// Runs the check called `name` (one of [`CHECKS`]).
pub async fn run_one(kit: &Kit, name: &str) -> CheckResult {
    match name {
        "put_replays" => put_replays(kit).await,
        "delete_replays" => delete_replays(kit).await,
        "reuse_is_refused" => reuse_is_refused(kit).await,
        "concurrent_duplicates_run_once" => concurrent_duplicates_run_once(kit).await,
        "records_expire" => records_expire(kit).await,
        other => Err(format!(
            "no check is called {other:?}; the checks are {CHECKS:?}"
        )),
    }
}

/// Runs every check in [`CHECKS`] and reports each.
pub async fn run_all(kit: &Kit) -> Report {
    run_checks("idempotency", CHECKS, |name| run_one(kit, name)).await
}
