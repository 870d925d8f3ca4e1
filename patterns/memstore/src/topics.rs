//! The topics behind memstore's pub/sub: one entry per (namespace, topic)
//! with at least one subscriber. Fan-out subscribers share a tokio
//! `broadcast` channel; each queue group keeps its members' channels and
//! hands each message to the next member in turn (round robin), skipping a
//! member whose buffer is full. A topic's entry is removed when its last
//! subscriber leaves, so an idle topic costs nothing.
//!
//! Delivery is at-most-once: a message published while nobody subscribes is
//! dropped, a fan-out subscriber that falls more than the buffer behind
//! misses the oldest messages, and a queue group whose every member is full
//! drops the message. Messages from one publisher reach each subscriber in
//! publish order: publishing holds the lock, and each channel is FIFO.
//!
//! No lock is held across an `.await` (there is none in here).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pattern_sdk::{Message, MessageStream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};

/// `(namespace, topic)`: namespaces cannot collide.
type Key = (String, String);

struct Topic {
    fanout: broadcast::Sender<Arc<Message>>,
    /// Fan-out subscribers (the broadcast's receivers, counted by us so the
    /// count is right whatever order a subscription's fields drop in).
    fanout_subscribers: usize,
    groups: BTreeMap<String, Group>,
}

impl Topic {
    fn is_idle(&self) -> bool {
        self.fanout_subscribers == 0 && self.groups.is_empty()
    }
}

#[derive(Default)]
struct Group {
    members: Vec<Member>,
    /// Index of the member that gets the next message.
    next: usize,
}

struct Member {
    id: u64,
    tx: mpsc::Sender<Arc<Message>>,
}

impl Group {
    /// Hands `message` to exactly one member: the next in turn whose buffer
    /// has room. `false` when every member is full (the message is dropped).
    fn deliver(&mut self, message: &Arc<Message>) -> bool {
        let n = self.members.len();
        for i in 0..n {
            let at = (self.next + i) % n;
            if self.members[at].tx.try_send(Arc::clone(message)).is_ok() {
                self.next = (at + 1) % n;
                return true;
            }
        }
        false
    }
}

/// Every live topic. Cheap to share: clone the `Arc`.
pub struct Topics {
    map: Mutex<HashMap<Key, Topic>>,
    /// Messages held per subscriber before it starts missing some.
    buffer: usize,
    /// Message ids are `{boot}-{seq}`: `boot` (the start time, in hex
    /// milliseconds) keeps them unique across restarts of the pattern.
    boot: u64,
    next_seq: AtomicU64,
    next_member: AtomicU64,
}

impl Topics {
    /// `buffer`: messages held for each subscriber (at least 1).
    pub fn new(buffer: usize) -> Arc<Self> {
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Arc::new(Self {
            map: Mutex::default(),
            buffer: buffer.max(1),
            boot,
            next_seq: AtomicU64::new(1),
            next_member: AtomicU64::new(1),
        })
    }

    // Every critical section leaves the map consistent, so a lock poisoned
    // by a panic elsewhere is still safe to use.
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Topic>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers a message to the topic's current subscribers and returns
    /// its id.
    pub fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Bytes,
        attributes: BTreeMap<String, String>,
    ) -> String {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let message_id = format!("{:x}-{seq}", self.boot);
        let message = Arc::new(Message {
            message_id: message_id.clone(),
            topic: topic.to_string(),
            payload,
            attributes,
            publish_time: SystemTime::now(),
        });
        let mut map = self.lock();
        let Some(t) = map.get_mut(&(namespace.to_owned(), topic.to_owned())) else {
            return message_id;
        };
        if t.fanout_subscribers > 0 {
            // Err only when there is no receiver, which the count rules out.
            let _ = t.fanout.send(Arc::clone(&message));
        }
        for (name, group) in &mut t.groups {
            if !group.deliver(&message) {
                tracing::warn!(
                    namespace,
                    topic,
                    queue_group = %name,
                    members = group.members.len(),
                    "every member of the queue group has {} undelivered messages; message dropped",
                    self.buffer
                );
            }
        }
        message_id
    }

    /// A subscription; fan-out when `queue_group` is `None`. It is
    /// established when this returns, and ends when the stream is dropped.
    pub fn subscribe(
        self: &Arc<Self>,
        namespace: &str,
        topic: &str,
        queue_group: Option<String>,
    ) -> MessageStream {
        let key = (namespace.to_owned(), topic.to_owned());
        let mut map = self.lock();
        let t = map.entry(key.clone()).or_insert_with(|| Topic {
            fanout: broadcast::Sender::new(self.buffer),
            fanout_subscribers: 0,
            groups: BTreeMap::new(),
        });
        let (receiver, membership) = match queue_group {
            None => {
                t.fanout_subscribers += 1;
                let rx = BroadcastStream::new(t.fanout.subscribe());
                (Receiver::Fanout(rx), Membership::Fanout)
            }
            Some(group) => {
                let id = self.next_member.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(self.buffer);
                t.groups
                    .entry(group.clone())
                    .or_default()
                    .members
                    .push(Member { id, tx });
                (
                    Receiver::Group(ReceiverStream::new(rx)),
                    Membership::Group { name: group, id },
                )
            }
        };
        drop(map);
        Box::pin(Subscription {
            receiver,
            leave: Leave {
                topics: Arc::clone(self),
                key,
                membership,
            },
        })
    }

    /// Topics with at least one subscriber (for tests and logs).
    pub fn live_topics(&self) -> usize {
        self.lock().len()
    }

    /// Members of `queue_group` on a topic (for tests).
    pub fn group_members(&self, namespace: &str, topic: &str, queue_group: &str) -> usize {
        self.lock()
            .get(&(namespace.to_owned(), topic.to_owned()))
            .and_then(|t| t.groups.get(queue_group))
            .map_or(0, |g| g.members.len())
    }
}

enum Membership {
    Fanout,
    Group { name: String, id: u64 },
}

/// Takes a subscription out of its topic when dropped, and the topic out of
/// the map when it was the last one.
struct Leave {
    topics: Arc<Topics>,
    key: Key,
    membership: Membership,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let mut map = self.topics.lock();
        let Some(t) = map.get_mut(&self.key) else {
            return;
        };
        match &self.membership {
            Membership::Fanout => t.fanout_subscribers = t.fanout_subscribers.saturating_sub(1),
            Membership::Group { name, id } => {
                if let Some(group) = t.groups.get_mut(name) {
                    group.members.retain(|m| m.id != *id);
                    if group.members.is_empty() {
                        t.groups.remove(name);
                    } else {
                        group.next %= group.members.len();
                    }
                }
            }
        }
        if t.is_idle() {
            map.remove(&self.key);
        }
    }
}

enum Receiver {
    Fanout(BroadcastStream<Arc<Message>>),
    Group(ReceiverStream<Arc<Message>>),
}

/// One subscriber's messages.
struct Subscription {
    receiver: Receiver,
    leave: Leave,
}

impl Stream for Subscription {
    type Item = Result<Message, pattern_sdk::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let next = match &mut this.receiver {
                Receiver::Fanout(rx) => match Pin::new(rx).poll_next(cx) {
                    Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                        tracing::warn!(
                            namespace = %this.leave.key.0,
                            topic = %this.leave.key.1,
                            missed,
                            "a subscriber fell behind and missed messages; raise \
                             `subscriber_buffer` or consume faster"
                        );
                        continue;
                    }
                    Poll::Ready(Some(Ok(m))) => Some(m),
                    Poll::Ready(None) => None,
                    Poll::Pending => return Poll::Pending,
                },
                Receiver::Group(rx) => match Pin::new(rx).poll_next(cx) {
                    Poll::Ready(m) => m,
                    Poll::Pending => return Poll::Pending,
                },
            };
            // The topic holds the senders while we are subscribed, so the
            // channel cannot close under us; end quietly if it ever does.
            return Poll::Ready(next.map(|m| Ok(Arc::unwrap_or_clone(m))));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use tokio_stream::StreamExt;

    use super::*;

    fn publish(t: &Topics, ns: &str, topic: &str, payload: &str) -> String {
        t.publish(ns, topic, Bytes::from(payload.to_string()), BTreeMap::new())
    }

    /// The payloads a stream has ready now, without waiting.
    fn ready(s: &mut MessageStream) -> Vec<String> {
        let mut out = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while let Poll::Ready(Some(m)) = s.as_mut().poll_next(&mut cx) {
            let m = m.unwrap();
            out.push(String::from_utf8(m.payload.to_vec()).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn every_fanout_subscriber_gets_every_message_in_order() {
        let t = Topics::new(16);
        let mut a = t.subscribe("ns", "t", None);
        let mut b = t.subscribe("ns", "t", None);
        let id = publish(&t, "ns", "t", "1");
        publish(&t, "ns", "t", "2");
        let first = a.next().await.unwrap().unwrap();
        assert_eq!(first.message_id, id);
        assert_eq!(first.topic, "t");
        assert_eq!(ready(&mut a), ["2"]);
        assert_eq!(ready(&mut b), ["1", "2"]);
    }

    #[tokio::test]
    async fn namespaces_and_topics_are_separate() {
        let t = Topics::new(16);
        let mut a = t.subscribe("ns", "t", None);
        publish(&t, "other", "t", "x");
        publish(&t, "ns", "u", "y");
        assert!(ready(&mut a).is_empty());
    }

    #[tokio::test]
    async fn nothing_is_replayed() {
        let t = Topics::new(16);
        publish(&t, "ns", "t", "before");
        let mut a = t.subscribe("ns", "t", None);
        publish(&t, "ns", "t", "after");
        assert_eq!(ready(&mut a), ["after"]);
    }

    #[tokio::test]
    async fn a_queue_group_shares_messages_round_robin() {
        let t = Topics::new(16);
        let mut a = t.subscribe("ns", "t", Some("g".into()));
        let mut b = t.subscribe("ns", "t", Some("g".into()));
        let mut other = t.subscribe("ns", "t", Some("h".into()));
        let mut fan = t.subscribe("ns", "t", None);
        for i in 0..6 {
            publish(&t, "ns", "t", &i.to_string());
        }
        let (got_a, got_b) = (ready(&mut a), ready(&mut b));
        assert_eq!(got_a, ["0", "2", "4"]);
        assert_eq!(got_b, ["1", "3", "5"]);
        assert_eq!(
            ready(&mut other).len(),
            6,
            "each group gets every message once"
        );
        assert_eq!(ready(&mut fan).len(), 6);
    }

    #[tokio::test]
    async fn a_full_member_is_skipped_and_a_full_group_drops() {
        let t = Topics::new(1);
        let mut a = t.subscribe("ns", "t", Some("g".into()));
        let mut b = t.subscribe("ns", "t", Some("g".into()));
        publish(&t, "ns", "t", "1"); // a
        publish(&t, "ns", "t", "2"); // b
        publish(&t, "ns", "t", "3"); // both full: dropped
        assert_eq!(ready(&mut a), ["1"]);
        publish(&t, "ns", "t", "4"); // b is full, so a
        assert_eq!(ready(&mut a), ["4"]);
        assert_eq!(ready(&mut b), ["2"]);
    }

    #[tokio::test]
    async fn a_lagging_fanout_subscriber_misses_the_oldest_and_goes_on() {
        let t = Topics::new(2);
        let mut a = t.subscribe("ns", "t", None);
        for i in 0..5 {
            publish(&t, "ns", "t", &i.to_string());
        }
        assert_eq!(ready(&mut a), ["3", "4"]);
        publish(&t, "ns", "t", "5");
        assert_eq!(ready(&mut a), ["5"]);
    }

    #[tokio::test]
    async fn leaving_removes_members_and_idle_topics() {
        let t = Topics::new(16);
        let a = t.subscribe("ns", "t", Some("g".into()));
        let mut b = t.subscribe("ns", "t", Some("g".into()));
        let fan = t.subscribe("ns", "t", None);
        assert_eq!(t.live_topics(), 1);
        assert_eq!(t.group_members("ns", "t", "g"), 2);
        drop(a);
        assert_eq!(t.group_members("ns", "t", "g"), 1);
        // After a member leaves, the rest of the group gets everything.
        for i in 0..4 {
            publish(&t, "ns", "t", &i.to_string());
        }
        assert_eq!(ready(&mut b), ["0", "1", "2", "3"]);
        drop(b);
        assert_eq!(t.group_members("ns", "t", "g"), 0);
        assert_eq!(t.live_topics(), 1, "the fan-out subscriber is still there");
        drop(fan);
        assert_eq!(t.live_topics(), 0);
        // Publishing to a topic nobody subscribes to creates nothing.
        publish(&t, "ns", "t", "x");
        assert_eq!(t.live_topics(), 0);
    }

    #[tokio::test]
    async fn message_ids_are_unique() {
        let t = Topics::new(16);
        let ids: HashSet<String> = (0..100).map(|_| publish(&t, "ns", "t", "")).collect();
        assert_eq!(ids.len(), 100);
    }
}
