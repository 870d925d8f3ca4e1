//! Idempotency records (pattern_sdk::idempotency): under (namespace, key),
//! the fingerprint of the first write with the key and what it answered,
//! until the retention runs out. The records' lock is held across the
//! write itself — a plain function call, no await — so claiming the key,
//! writing and recording are one step for every other call; a crash loses
//! the map and the records together.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use pattern_sdk::Error;
use pattern_sdk::idempotency::{Once, Outcome};
use tokio::time::Instant;

type Key = (String, String);

/// What a recorded write answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Put,
    Deleted(bool),
    Published(String),
}

struct Record {
    fingerprint: String,
    answer: Answer,
    expires_at: Instant,
}

#[derive(Default)]
struct Maps {
    records: HashMap<Key, Record>,
    /// Soonest first, so purging never scans.
    expirations: BTreeSet<(Instant, Key)>,
}

impl Maps {
    fn purge_expired(&mut self, now: Instant) -> usize {
        let mut purged = 0;
        while self.expirations.first().is_some_and(|(at, _)| *at <= now) {
            if let Some((at, key)) = self.expirations.pop_first()
                && self.records.get(&key).is_some_and(|r| r.expires_at == at)
            {
                self.records.remove(&key);
                purged += 1;
            }
        }
        purged
    }
}

pub struct Records {
    maps: Mutex<Maps>,
    max: usize,
}

impl Records {
    /// At most `max` live records.
    pub fn new(max: usize) -> Self {
        Records {
            maps: Mutex::default(),
            max,
        }
    }

    /// Runs `write` once per `once.key` in `namespace`: replays the
    /// recorded answer for the same fingerprint, refuses another, else
    /// writes and records what `write` answered (nothing when it fails).
    pub fn once(
        &self,
        namespace: &str,
        once: &Once,
        write: impl FnOnce() -> Result<Answer, Error>,
    ) -> Result<Outcome<Answer>, Error> {
        let now = Instant::now();
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (namespace.to_string(), once.key.clone());
        if let Some(r) = maps.records.get(&key)
            && r.expires_at > now
        {
            return Ok(if r.fingerprint == once.fingerprint {
                Outcome::Replayed(r.answer.clone())
            } else {
                Outcome::Reused
            });
        }
        if maps.records.len() >= self.max && maps.purge_expired(now) == 0 {
            return Err(Error::resource_exhausted(format!(
                "memstore keeps at most {} idempotency records (config.max_keys) and all are live; retry after some expire, or send writes without idempotency-key",
                self.max
            )));
        }
        let answer = write()?;
        let expires_at = now + once.retention;
        maps.expirations.insert((expires_at, key.clone()));
        maps.records.insert(
            key,
            Record {
                fingerprint: once.fingerprint.clone(),
                answer: answer.clone(),
                expires_at,
            },
        );
        Ok(Outcome::Executed(answer))
    }

    pub fn purge_expired(&self) -> usize {
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.purge_expired(Instant::now())
    }
}

/// The answer of a [`Records::once`] as the type the SDK wants. A record
/// of another method's answer with the same fingerprint (only a forged
/// fingerprint can do that: it covers the method) is a reuse of the key.
pub fn outcome<T>(
    outcome: Outcome<Answer>,
    pick: impl Fn(Answer) -> Option<T>,
) -> Result<Outcome<T>, Error> {
    Ok(match outcome {
        Outcome::Executed(a) => pick(a).map_or(Outcome::Reused, Outcome::Executed),
        Outcome::Replayed(a) => pick(a).map_or(Outcome::Reused, Outcome::Replayed),
        Outcome::Reused => Outcome::Reused,
        Outcome::InUse => Outcome::InUse,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn once(key: &str, fp: &str) -> Once {
        Once {
            key: key.into(),
            fingerprint: fp.into(),
            retention: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn writes_once_replays_refuses_reuse_and_expires() {
        let r = Records::new(10);
        let mut writes = 0;
        let mut write = || {
            writes += 1;
            Ok(Answer::Deleted(true))
        };
        assert_eq!(
            r.once("ns", &once("k", "a"), &mut write).unwrap(),
            Outcome::Executed(Answer::Deleted(true))
        );
        assert_eq!(
            r.once("ns", &once("k", "a"), &mut write).unwrap(),
            Outcome::Replayed(Answer::Deleted(true))
        );
        assert_eq!(
            r.once("ns", &once("k", "b"), &mut write).unwrap(),
            Outcome::Reused
        );
        assert_eq!(
            r.once("other", &once("k", "b"), &mut write).unwrap(),
            Outcome::Executed(Answer::Deleted(true)),
            "scoped by namespace"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(r.purge_expired(), 2);
        assert!(matches!(
            r.once("ns", &once("k", "b"), &mut write).unwrap(),
            Outcome::Executed(_)
        ));
        assert_eq!(writes, 3);
    }

    #[test]
    fn a_failed_write_records_nothing() {
        let r = Records::new(10);
        let failed = r.once("ns", &once("k", "a"), || {
            Err(Error::resource_exhausted("full"))
        });
        assert!(failed.is_err());
        assert!(matches!(
            r.once("ns", &once("k", "a"), || Ok(Answer::Put)).unwrap(),
            Outcome::Executed(_)
        ));
    }
}
