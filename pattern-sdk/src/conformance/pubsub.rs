//! The pub/sub conformance suite: checks any `trellis.data.v1.PubSub`
//! endpoint — a pattern process, or the proxy in front of one — against the
//! contract in `proto/trellis/data/v1/pubsub.proto`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use pattern_sdk::conformance::kv::PatternProcess;
//! use pattern_sdk::conformance::pubsub::{self, Kit};
//! use trellis_proto::data::v1::pub_sub_client::PubSubClient;
//!
//! let pattern = PatternProcess::spawn(
//!     "target/debug/trellis-memstore".as_ref(),
//!     "mem",
//!     serde_json::json!({}),
//! )
//! .await?;
//! let kit = Kit::new(PubSubClient::new(pattern.channel()), "conformance", "conformance-other");
//! let report = pubsub::run_all(&kit).await;
//! println!("{report}");
//! report.assert_all_passed();
//! # Ok(()) }
//! ```
//!
//! Every check is a `pub async fn(&Kit) -> Result<(), String>`; each uses
//! topics of its own (`ck.<run>.<check>…`), so checks never see each other's
//! messages, even against a shared backend.
//!
//! **Waiting for subscriptions.** A subscription is established some time
//! after `Subscribe` is called (through the proxy, in another process, on
//! a backend server), and pub/sub has no replay, so a message published too
//! early is simply never seen. The suite therefore never publishes real
//! messages until every subscriber has proven it is live: it publishes
//! *probe* messages (attribute [`PROBE_ATTRIBUTE`]) on the topic, one after
//! another, until every subscriber has received at least one (for a queue
//! group: every member, since each probe reaches one member). Subscribers
//! set probes aside, so they never count as real messages. The same step
//! serves as a *fence* after the real messages: once a subscriber sees a
//! probe published after them, anything the backend was going to deliver
//! from before has arrived (per-publisher ordering), so counts can be
//! checked exactly without sleeping. All waits are bounded by
//! [`Kit::patience`]; none is a fixed sleep, so the suite does not depend on
//! the machine's speed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::run_checks;
pub use super::{CheckResult, Outcome, Report};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_proto::data::v1::pub_sub_client::PubSubClient;
use trellis_proto::data::v1::{Message, PublishRequest, SubscribeRequest};

/// The attribute that marks a probe message; its value is unique per probe.
pub const PROBE_ATTRIBUTE: &str = "conformance-probe";

/// How long to wait for a probe before publishing the next one. Only the
/// number of probes depends on it, never the outcome.
const PROBE_GAP: Duration = Duration::from_millis(25);

/// Where the suite runs: a PubSub client and two namespaces served by the
/// endpoint under test (the second one for the isolation check).
#[derive(Clone)]
pub struct Kit {
    client: PubSubClient<Channel>,
    namespace: String,
    other_namespace: String,
    run: String,
    patience: Duration,
}

impl Kit {
    /// A kit for `client`; `namespace` and `other_namespace` must both be
    /// served by it (through the proxy: both routed to the pattern under
    /// test; directly against a pattern: any two names).
    pub fn new(
        client: PubSubClient<Channel>,
        namespace: impl Into<String>,
        other_namespace: impl Into<String>,
    ) -> Self {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let run = format!("{nanos:x}-{}", RUNS.fetch_add(1, Ordering::Relaxed));
        Self {
            client,
            namespace: namespace.into(),
            other_namespace: other_namespace.into(),
            run,
            patience: Duration::from_secs(30),
        }
    }

    /// The longest any single wait may take (default 30 s). Only matters
    /// when something is broken.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// A topic unique to this run and `check`.
    pub fn topic(&self, check: &str) -> String {
        format!("ck.{}.{check}", self.run)
    }

    /// Publishes `payload` with `attributes` to `topic` in `namespace`;
    /// returns the message id.
    pub async fn publish_to(
        &self,
        namespace: &str,
        topic: &str,
        payload: &[u8],
        attributes: &[(&str, &str)],
    ) -> Result<String, String> {
        let req = PublishRequest {
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            payload: payload.to_vec(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let mut client = self.client.clone();
        match tokio::time::timeout(self.patience, client.publish(req)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().message_id),
            Ok(Err(s)) => Err(format!("Publish to {topic:?} failed: {}", show(&s))),
            Err(_) => Err(format!(
                "Publish to {topic:?} got no answer within {:?}",
                self.patience
            )),
        }
    }

    /// [`Kit::publish_to`] in the kit's namespace, without attributes.
    pub async fn publish(&self, topic: &str, payload: &[u8]) -> Result<String, String> {
        self.publish_to(&self.namespace, topic, payload, &[]).await
    }

    /// Opens a subscription (not yet known to be live: see [`Kit::ready`]).
    pub async fn subscribe_to(
        &self,
        namespace: &str,
        topic: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscriber, String> {
        let req = SubscribeRequest {
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            queue_group: queue_group.unwrap_or_default().to_string(),
        };
        let mut client = self.client.clone();
        let stream = match tokio::time::timeout(self.patience, client.subscribe(req)).await {
            Ok(Ok(resp)) => resp.into_inner(),
            Ok(Err(s)) => return Err(format!("Subscribe to {topic:?} failed: {}", show(&s))),
            Err(_) => {
                return Err(format!(
                    "Subscribe to {topic:?} got no answer within {:?}",
                    self.patience
                ));
            }
        };
        Ok(Subscriber::new(stream))
    }

    /// [`Kit::subscribe_to`] in the kit's namespace.
    pub async fn subscribe(
        &self,
        topic: &str,
        queue_group: Option<&str>,
    ) -> Result<Subscriber, String> {
        self.subscribe_to(&self.namespace, topic, queue_group).await
    }

    /// Publishes probes to `topic` in `namespace` until every one of `subs`
    /// has received a probe published by this call: they are live, and
    /// everything published to them before this call has arrived. See the
    /// module docs.
    pub async fn ready_in(
        &self,
        namespace: &str,
        topic: &str,
        subs: &mut [&mut Subscriber],
    ) -> CheckResult {
        let deadline = Instant::now() + self.patience;
        let baseline: Vec<u64> = subs.iter().map(|s| s.probes_seen()).collect();
        let mut sent = 0u64;
        loop {
            sent += 1;
            let probe = format!("{}-{sent}", self.run);
            self.publish_to(namespace, topic, b"probe", &[(PROBE_ATTRIBUTE, &probe)])
                .await?;
            let wait_until = (Instant::now() + PROBE_GAP).min(deadline);
            for (sub, base) in subs.iter_mut().zip(&baseline) {
                sub.wait_probe_beyond(*base, wait_until).await?;
            }
            if subs
                .iter()
                .zip(&baseline)
                .all(|(s, base)| s.probes_seen() > *base)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let behind = subs
                    .iter()
                    .zip(&baseline)
                    .filter(|(s, base)| s.probes_seen() <= **base)
                    .count();
                return Err(format!(
                    "{behind} of {} subscribers to {topic:?} saw none of {sent} probe messages \
                     within {:?}: the subscriptions never became live",
                    subs.len(),
                    self.patience
                ));
            }
        }
    }

    /// [`Kit::ready_in`] in the kit's namespace.
    pub async fn ready(&self, topic: &str, subs: &mut [&mut Subscriber]) -> CheckResult {
        self.ready_in(&self.namespace.clone(), topic, subs).await
    }
}

/// `CODE: message`, for error texts.
fn show(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// One open subscription, read by a task of its own. Probe messages are
/// counted and set aside; everything else is queued for the check.
/// Dropping it cancels the call.
pub struct Subscriber {
    messages: mpsc::UnboundedReceiver<Result<Message, Status>>,
    /// How many probes arrived.
    probes: watch::Receiver<u64>,
    /// The values of the probes that arrived, in order.
    probe_values: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Subscriber {
    fn new(mut stream: tonic::Streaming<Message>) -> Self {
        let (tx, messages) = mpsc::unbounded_channel();
        let (probe_tx, probes) = watch::channel(0u64);
        let probe_values = Arc::new(Mutex::new(Vec::new()));
        let values = Arc::clone(&probe_values);
        let reader = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(m)) if m.attributes.contains_key(PROBE_ATTRIBUTE) => {
                        if let Some(v) = m.attributes.get(PROBE_ATTRIBUTE) {
                            values
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(v.clone());
                        }
                        probe_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status));
                        return;
                    }
                }
            }
        });
        Self {
            messages,
            probes,
            probe_values,
            reader,
        }
    }

    /// The values of the probes received so far.
    pub fn probe_values(&self) -> Vec<String> {
        self.probe_values
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Probe messages received so far.
    pub fn probes_seen(&self) -> u64 {
        *self.probes.borrow()
    }

    /// Waits until more than `base` probes were seen, or `until`.
    async fn wait_probe_beyond(&mut self, base: u64, until: Instant) -> CheckResult {
        let wait = self.probes.wait_for(|n| *n > base);
        match tokio::time::timeout_at(until.into(), wait).await {
            Ok(Ok(_)) | Err(_) => Ok(()),
            // The reader ended: the stream failed or closed.
            Ok(Err(_)) => match self.messages.try_recv() {
                Ok(Err(status)) => Err(format!("the subscription failed: {}", show(&status))),
                _ => Err("the subscription stream ended".to_string()),
            },
        }
    }

    /// The next real message, waiting at most `patience`.
    pub async fn next(&mut self, patience: Duration) -> Result<Message, String> {
        match tokio::time::timeout(patience, self.messages.recv()).await {
            Ok(Some(Ok(m))) => Ok(m),
            Ok(Some(Err(status))) => Err(format!("the subscription failed: {}", show(&status))),
            Ok(None) => Err("the subscription stream ended".to_string()),
            Err(_) => Err(format!("no message arrived within {patience:?}")),
        }
    }

    /// `n` real messages, in arrival order.
    pub async fn take(&mut self, n: usize, patience: Duration) -> Result<Vec<Message>, String> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let m = self
                .next(patience)
                .await
                .map_err(|e| format!("after {} of {n} messages: {e}", out.len()))?;
            out.push(m);
        }
        Ok(out)
    }

    /// The real messages that have already arrived, without waiting.
    pub fn drain(&mut self) -> Result<Vec<Message>, String> {
        let mut out = Vec::new();
        loop {
            match self.messages.try_recv() {
                Ok(Ok(m)) => out.push(m),
                Ok(Err(status)) => {
                    return Err(format!("the subscription failed: {}", show(&status)));
                }
                Err(_) => return Ok(out),
            }
        }
    }
}

/// Does `numbers` hold `len` consecutive numbers?
fn has_run(numbers: &BTreeSet<u64>, len: usize) -> bool {
    let mut run = 0;
    let mut last = None;
    for &n in numbers {
        run = if last.is_some_and(|l: u64| l + 1 == n) {
            run + 1
        } else {
            1
        };
        if run >= len {
            return true;
        }
        last = Some(n);
    }
    false
}

fn payload_text(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

fn payloads(ms: &[Message]) -> Vec<String> {
    ms.iter().map(payload_text).collect()
}

// The checks ------------------------------------------------------------------

/// A message arrives whole: the id Publish returned, topic, binary payload,
/// attributes, and a publish time.
pub async fn round_trip(kit: &Kit) -> CheckResult {
    let topic = kit.topic("round_trip");
    let mut sub = kit.subscribe(&topic, None).await?;
    kit.ready(&topic, &mut [&mut sub]).await?;
    let before = SystemTime::now();
    let payload: Vec<u8> = vec![0, 1, 2, 0xff, 0xfe, b'\n', 0];
    let attributes = [("trace-id", "abc-123"), ("unicode", "é ✓"), ("empty", "")];
    let id = kit
        .publish_to(&kit.namespace, &topic, &payload, &attributes)
        .await?;
    if id.is_empty() {
        return Err("Publish returned an empty message_id".into());
    }
    let m = sub.next(kit.patience).await?;
    if m.message_id != id {
        return Err(format!(
            "message_id: Publish returned {id:?}, the subscriber got {:?}",
            m.message_id
        ));
    }
    if m.topic != topic {
        return Err(format!("topic: want {topic:?}, got {:?}", m.topic));
    }
    if m.payload != payload {
        return Err(format!("payload: want {payload:?}, got {:?}", m.payload));
    }
    let want: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if m.attributes != want {
        return Err(format!("attributes: want {want:?}, got {:?}", m.attributes));
    }
    let Some(at) = m.publish_time.and_then(|t| SystemTime::try_from(t).ok()) else {
        return Err("publish_time is missing or invalid".into());
    };
    // Generous bounds: only a wildly wrong clock or unit fails this.
    let slack = Duration::from_secs(300);
    if at + slack < before || at > SystemTime::now() + slack {
        return Err(format!(
            "publish_time {at:?} is not near the time of publishing ({before:?})"
        ));
    }
    Ok(())
}

/// Every fan-out subscriber receives every message.
pub async fn fan_out(kit: &Kit) -> CheckResult {
    let topic = kit.topic("fan_out");
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(kit.subscribe(&topic, None).await?);
    }
    kit.ready(&topic, &mut subs.iter_mut().collect::<Vec<_>>())
        .await?;
    let n = 20;
    for i in 0..n {
        kit.publish(&topic, format!("m{i}").as_bytes()).await?;
    }
    let want: HashSet<String> = (0..n).map(|i| format!("m{i}")).collect();
    for (i, sub) in subs.iter_mut().enumerate() {
        let got: HashSet<String> = payloads(&sub.take(n, kit.patience).await?)
            .into_iter()
            .collect();
        if got != want {
            return Err(format!(
                "subscriber {i} got {} distinct messages, want all {n}: missing {:?}",
                got.len(),
                want.difference(&got).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// Messages from one publisher arrive in publish order.
pub async fn ordering(kit: &Kit) -> CheckResult {
    let topic = kit.topic("ordering");
    let mut a = kit.subscribe(&topic, None).await?;
    let mut b = kit.subscribe(&topic, None).await?;
    kit.ready(&topic, &mut [&mut a, &mut b]).await?;
    let n = 200;
    for i in 0..n {
        kit.publish(&topic, i.to_string().as_bytes()).await?;
    }
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    for (name, sub) in [("first", &mut a), ("second", &mut b)] {
        let got = payloads(&sub.take(n, kit.patience).await?);
        if got != want {
            let at = got.iter().zip(&want).position(|(g, w)| g != w);
            return Err(format!(
                "the {name} subscriber got messages out of order: first difference at \
                 position {at:?}"
            ));
        }
    }
    Ok(())
}

/// Each message goes to exactly one member of each queue group (and to
/// every fan-out subscriber), and the load is shared: more than one member
/// of a group receives some.
pub async fn queue_groups(kit: &Kit) -> CheckResult {
    let topic = kit.topic("queue_groups");
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(kit.subscribe(&topic, Some("workers")).await?);
    }
    let mut auditors = Vec::new();
    for _ in 0..2 {
        auditors.push(kit.subscribe(&topic, Some("auditors")).await?);
    }
    let mut fan = kit.subscribe(&topic, None).await?;
    {
        let mut all: Vec<&mut Subscriber> = workers.iter_mut().collect();
        all.extend(auditors.iter_mut());
        all.push(&mut fan);
        kit.ready(&topic, &mut all).await?;
    }
    let n = 60;
    for i in 0..n {
        kit.publish(&topic, format!("m{i}").as_bytes()).await?;
    }
    fan.take(n, kit.patience).await?;
    for (group, members) in [("workers", &mut workers), ("auditors", &mut auditors)] {
        // Wait until the group has all n between them, then fence, so a
        // duplicate on its way would be counted too.
        let mut got: Vec<Vec<String>> = vec![Vec::new(); members.len()];
        let deadline = Instant::now() + kit.patience;
        while got.iter().map(Vec::len).sum::<usize>() < n {
            if Instant::now() >= deadline {
                return Err(format!(
                    "queue group {group:?} received {} of {n} messages within {:?}",
                    got.iter().map(Vec::len).sum::<usize>(),
                    kit.patience
                ));
            }
            for (i, m) in members.iter_mut().enumerate() {
                got[i].extend(payloads(&m.drain()?));
            }
            if got.iter().map(Vec::len).sum::<usize>() < n {
                tokio::time::sleep(PROBE_GAP).await;
            }
        }
        kit.ready(&topic, &mut members.iter_mut().collect::<Vec<_>>())
            .await?;
        for (i, m) in members.iter_mut().enumerate() {
            got[i].extend(payloads(&m.drain()?));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for p in got.iter().flatten() {
            *seen.entry(p).or_default() += 1;
        }
        let dupes: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
        if !dupes.is_empty() || seen.len() != n {
            return Err(format!(
                "queue group {group:?}: want each of {n} messages exactly once; got {} \
                 distinct, duplicated: {dupes:?}",
                seen.len()
            ));
        }
        let sharing = got.iter().filter(|g| !g.is_empty()).count();
        if sharing < 2 {
            return Err(format!(
                "queue group {group:?}: one member received all {n} messages; the load must \
                 be shared (per member: {:?})",
                got.iter().map(Vec::len).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// A subscriber that goes away gets nothing more: once a queue group member
/// has cancelled its call, the rest of its group receives every message.
/// (This is also how the end of a subscription is seen end to end through
/// the proxy: an upstream call left behind would keep taking a share.)
pub async fn no_delivery_after_unsubscribe(kit: &Kit) -> CheckResult {
    let topic = kit.topic("unsubscribe");
    let leaver = kit.subscribe(&topic, Some("g")).await?;
    let mut stayer = kit.subscribe(&topic, Some("g")).await?;
    // Both live: probes until each has one.
    let mut leaver = leaver;
    kit.ready(&topic, &mut [&mut leaver, &mut stayer]).await?;
    drop(leaver);
    // The cancellation travels on its own (client → proxy → pattern →
    // backend). Publish numbered probes until the stayer has received a run
    // of consecutive numbers: while the leaver is still subscribed, each
    // probe has about even odds of going to it instead (round robin: it
    // certainly would). Waiting between probes only paces them; the
    // outcome depends on which numbers arrived, not on timing.
    let streak = 20;
    let deadline = Instant::now() + kit.patience;
    let mut sent = 0u64;
    loop {
        let got: BTreeSet<u64> = stayer
            .probe_values()
            .iter()
            .filter_map(|v| v.strip_prefix("seq-")?.parse().ok())
            .collect();
        if has_run(&got, streak) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {sent} numbered probes in {:?}, the remaining queue group member never \
                 received {streak} in a row: the departed member still takes messages",
                kit.patience
            ));
        }
        sent += 1;
        let before = stayer.probes_seen();
        kit.publish_to(
            &kit.namespace,
            &topic,
            b"probe",
            &[(PROBE_ATTRIBUTE, &format!("seq-{sent}"))],
        )
        .await?;
        let _ = tokio::time::timeout(PROBE_GAP, stayer.probes.wait_for(|n| *n > before)).await;
    }
    let n = 20;
    for i in 0..n {
        kit.publish(&topic, format!("m{i}").as_bytes()).await?;
    }
    let got = payloads(&stayer.take(n, kit.patience).await?);
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    if got != want {
        return Err(format!("the remaining member got {got:?}, want {want:?}"));
    }
    Ok(())
}

/// Nothing is replayed: a new subscriber sees only what is published after
/// it is live, and a message published while nobody listens is gone.
pub async fn no_replay(kit: &Kit) -> CheckResult {
    let topic = kit.topic("no_replay");
    for i in 0..5 {
        kit.publish(&topic, format!("early{i}").as_bytes()).await?;
    }
    let mut first = kit.subscribe(&topic, None).await?;
    kit.ready(&topic, &mut [&mut first]).await?;
    kit.publish(&topic, b"one").await?;
    let got = first.next(kit.patience).await?;
    if payload_text(&got) != "one" {
        return Err(format!(
            "a new subscriber got {:?} first; messages published before it subscribed must \
             not be replayed",
            payload_text(&got)
        ));
    }
    drop(first);
    kit.publish(&topic, b"unheard").await?;
    let mut second = kit.subscribe(&topic, None).await?;
    kit.ready(&topic, &mut [&mut second]).await?;
    kit.publish(&topic, b"two").await?;
    let got = second.next(kit.patience).await?;
    if payload_text(&got) != "two" {
        return Err(format!(
            "a resubscribed subscriber got {:?} first, want \"two\"",
            payload_text(&got)
        ));
    }
    Ok(())
}

/// A topic in one namespace is not the same topic in another.
pub async fn namespace_isolation(kit: &Kit) -> CheckResult {
    let topic = kit.topic("isolation");
    let mut here = kit.subscribe(&topic, None).await?;
    let mut there = kit.subscribe_to(&kit.other_namespace, &topic, None).await?;
    kit.ready(&topic, &mut [&mut here]).await?;
    kit.ready_in(&kit.other_namespace, &topic, &mut [&mut there])
        .await?;
    kit.publish(&topic, b"here").await?;
    kit.publish_to(&kit.other_namespace, &topic, b"there", &[])
        .await?;
    let got_here = payload_text(&here.next(kit.patience).await?);
    let got_there = payload_text(&there.next(kit.patience).await?);
    // Fence both, then nothing else may have arrived.
    kit.ready(&topic, &mut [&mut here]).await?;
    kit.ready_in(&kit.other_namespace, &topic, &mut [&mut there])
        .await?;
    let extra_here = payloads(&here.drain()?);
    let extra_there = payloads(&there.drain()?);
    if got_here != "here"
        || got_there != "there"
        || !extra_here.is_empty()
        || !extra_there.is_empty()
    {
        return Err(format!(
            "namespace {:?} got {got_here:?} then {extra_here:?}, namespace {:?} got \
             {got_there:?} then {extra_there:?}; each must get only its own message",
            kit.namespace, kit.other_namespace
        ));
    }
    Ok(())
}

/// Large payloads within the limit arrive intact (512 KiB: every backend
/// must take that much; NATS counts headers against its 1 MiB default).
pub async fn large_payload(kit: &Kit) -> CheckResult {
    let topic = kit.topic("large_payload");
    let mut sub = kit.subscribe(&topic, None).await?;
    kit.ready(&topic, &mut [&mut sub]).await?;
    let payload: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
    kit.publish(&topic, &payload).await?;
    let got = sub.next(kit.patience).await?;
    if got.payload != payload {
        return Err(format!(
            "a {} byte payload arrived as {} bytes (or altered)",
            payload.len(),
            got.payload.len()
        ));
    }
    Ok(())
}

/// Bad requests are INVALID_ARGUMENT and name the field.
pub async fn invalid_requests(kit: &Kit) -> CheckResult {
    let topic = kit.topic("invalid");
    let mut client = kit.client.clone();
    let cases: Vec<(&str, PublishRequest)> = vec![
        (
            "topic",
            PublishRequest {
                namespace: kit.namespace.clone(),
                topic: "has space".into(),
                ..Default::default()
            },
        ),
        (
            "payload",
            PublishRequest {
                namespace: kit.namespace.clone(),
                topic: topic.clone(),
                payload: vec![0; crate::validate::MAX_PAYLOAD_BYTES + 1],
                ..Default::default()
            },
        ),
        (
            "attributes",
            PublishRequest {
                namespace: kit.namespace.clone(),
                topic: topic.clone(),
                attributes: [("trellis-message-id".to_string(), "x".to_string())].into(),
                ..Default::default()
            },
        ),
    ];
    for (field, req) in cases {
        match client.publish(req).await {
            Err(s) if s.code() == Code::InvalidArgument && s.message().contains(field) => {}
            Err(s) => {
                return Err(format!(
                    "a bad {field}: want INVALID_ARGUMENT naming {field:?}, got {}",
                    show(&s)
                ));
            }
            Ok(_) => return Err(format!("a bad {field} was accepted")),
        }
    }
    let req = SubscribeRequest {
        namespace: kit.namespace.clone(),
        topic: topic.clone(),
        queue_group: "bad group".into(),
    };
    match client.subscribe(req).await {
        Err(s) if s.code() == Code::InvalidArgument && s.message().contains("queue_group") => {
            Ok(())
        }
        Err(s) => Err(format!(
            "a bad queue_group: want INVALID_ARGUMENT, got {}",
            show(&s)
        )),
        Ok(_) => Err("a bad queue_group was accepted".into()),
    }
}

/// The name and function of every check, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "round_trip",
    "fan_out",
    "ordering",
    "queue_groups",
    "no_delivery_after_unsubscribe",
    "no_replay",
    "namespace_isolation",
    "large_payload",
    "invalid_requests",
];

/// Runs the check called `name` (one of [`CHECKS`]).
pub async fn run_one(kit: &Kit, name: &str) -> CheckResult {
    match name {
        "round_trip" => round_trip(kit).await,
        "fan_out" => fan_out(kit).await,
        "ordering" => ordering(kit).await,
        "queue_groups" => queue_groups(kit).await,
        "no_delivery_after_unsubscribe" => no_delivery_after_unsubscribe(kit).await,
        "no_replay" => no_replay(kit).await,
        "namespace_isolation" => namespace_isolation(kit).await,
        "large_payload" => large_payload(kit).await,
        "invalid_requests" => invalid_requests(kit).await,
        other => Err(format!(
            "no check is called {other:?}; the checks are {CHECKS:?}"
        )),
    }
}

/// Runs every check in [`CHECKS`], one after another, and reports each.
/// A check that fails does not stop the others.
pub async fn run_all(kit: &Kit) -> Report {
    run_checks("pubsub", CHECKS, |name| run_one(kit, name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_consecutive_numbers() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        assert!(has_run(&set(&[1, 2, 3]), 3));
        assert!(!has_run(&set(&[1, 2, 4, 5]), 3));
        assert!(has_run(&set(&[1, 3, 4, 5, 9]), 3));
        assert!(!has_run(&set(&[]), 1));
        assert!(has_run(&set(&[7]), 1));
    }
}
