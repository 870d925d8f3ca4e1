//! Idempotency records (pattern_sdk::idempotency) in `<table>_idempotency`:
//! under (namespace, key), the fingerprint of the first write with the key
//! and what it answered, until `expires_at`.
//!
//! A keyed write is one READ COMMITTED transaction:
//!
//! 1. claim the key: `INSERT … ON CONFLICT (namespace, key) DO UPDATE …
//!    WHERE expires_at <= now() RETURNING true` inserts a record, or takes
//!    over an expired one (an expired record counts as absent);
//! 2. if that returned no row, a live record holds the key: read it (a new
//!    snapshot: it sees a record committed while the claim waited), roll
//!    back, and answer Replayed (same fingerprint, its answer) or Reused,
//!    having written nothing;
//! 3. else do the write with the same SQL as a plain Put or Delete, store
//!    its answer in the record, and COMMIT.
//!
//! A concurrent duplicate blocks on the record's primary key at step 1
//! until the first transaction ends: after a commit it finds the record
//! (→ Replayed), after a rollback it claims the key itself. A failed write
//! rolls the claim back with it, so it leaves no record; and a crash
//! commits both or neither.

use std::time::Duration;

use deadpool_postgres::Client;
use pattern_sdk::Error;
use pattern_sdk::idempotency::{Once, Outcome};
use pattern_sdk::validate::MAX_TTL_SECONDS;
use tokio_postgres::IsolationLevel;

use crate::schema::Queries;
use crate::writes;

/// The longest retention kept: the longest TTL (10,000 years), so that
/// `now() + retention` stays a valid timestamp whatever a direct caller
/// asks for.
const MAX_RETENTION: Duration = Duration::from_secs(MAX_TTL_SECONDS.unsigned_abs());

/// What a recorded write answered, as the `answer` column holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `put`.
    Put,
    /// `deleted` (a live row was removed) or `not_deleted`.
    Deleted(bool),
}

impl Answer {
    fn to_sql(self) -> &'static str {
        match self {
            Answer::Put => "put",
            Answer::Deleted(true) => "deleted",
            Answer::Deleted(false) => "not_deleted",
        }
    }

    fn from_sql(s: &str) -> Option<Answer> {
        match s {
            "put" => Some(Answer::Put),
            "deleted" => Some(Answer::Deleted(true)),
            "not_deleted" => Some(Answer::Deleted(false)),
            _ => None,
        }
    }
}

/// The write a key guards, with its arguments.
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    /// `ttl` in microseconds, `None` for no expiry.
    Put {
        key: &'a str,
        value: &'a [u8],
        ttl: Option<i64>,
    },
    Delete {
        key: &'a str,
    },
}

impl Write<'_> {
    async fn run(
        self,
        tx: &deadpool_postgres::Transaction<'_>,
        queries: &Queries,
        namespace: &str,
    ) -> Result<Answer, tokio_postgres::Error> {
        match self {
            Write::Put { key, value, ttl } => {
                writes::put(tx, &queries.put, namespace, key, value, ttl)
                    .await
                    .map(|()| Answer::Put)
            }
            Write::Delete { key } => writes::delete(tx, &queries.delete, namespace, key)
                .await
                .map(Answer::Deleted),
        }
    }
}

/// What a keyed write's transaction did, with the record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The key was free: the write ran, and its answer is committed with it.
    Ran(Answer),
    /// A live record holds the key; nothing was written.
    Held {
        fingerprint: String,
        answer: Option<String>,
    },
    /// The claim found a live record but the read after it did not. It
    /// cannot happen (the claim locks the record until the transaction
    /// ends); nothing was written.
    Vanished,
}

/// Runs `write` once per `once.key` in `namespace`, in one transaction on
/// `client` (see the module doc).
pub async fn once(
    client: &mut Client,
    queries: &Queries,
    namespace: &str,
    once: &Once,
    write: Write<'_>,
) -> Result<Claimed, tokio_postgres::Error> {
    let retention = crate::ttl_micros(once.retention.min(MAX_RETENTION));
    // Explicit: step 2 needs a new snapshot per statement, whatever the
    // server's default_transaction_isolation says.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await?;
    let claim = tx.prepare_cached(&queries.claim).await?;
    let claimed = tx
        .query_opt(
            &claim,
            &[&namespace, &once.key, &once.fingerprint, &retention],
        )
        .await?
        .is_some();
    if !claimed {
        let recorded = tx.prepare_cached(&queries.recorded).await?;
        let row = tx.query_opt(&recorded, &[&namespace, &once.key]).await?;
        let held = match row {
            Some(row) => Claimed::Held {
                fingerprint: row.try_get(0)?,
                answer: row.try_get(1)?,
            },
            None => Claimed::Vanished,
        };
        // Nothing was written; this releases the record's lock.
        tx.rollback().await?;
        return Ok(held);
    }
    // On an error from here on, dropping `tx` rolls the claim back.
    let answer = write.run(&tx, queries, namespace).await?;
    let record = tx.prepare_cached(&queries.record).await?;
    tx.execute(&record, &[&namespace, &once.key, &answer.to_sql()])
        .await?;
    tx.commit().await?;
    Ok(Claimed::Ran(answer))
}

/// The SDK's [`Outcome`] for what [`once`] did, with the answer `pick`
/// takes from the record; an internal error for a record this pattern
/// cannot have written (no answer, an unknown one, or another method's:
/// the fingerprint covers the method, so a replay's record is always its
/// own method's).
pub fn outcome<T>(
    claimed: Claimed,
    once: &Once,
    pick: impl FnOnce(Answer) -> Option<T>,
) -> Result<Outcome<T>, Error> {
    match claimed {
        Claimed::Ran(answer) => pick(answer)
            .map(Outcome::Executed)
            .ok_or_else(|| Error::internal("an idempotent write answered for another method")),
        Claimed::Held { fingerprint, .. } if fingerprint != once.fingerprint => Ok(Outcome::Reused),
        Claimed::Held { answer, .. } => answer
            .as_deref()
            .and_then(Answer::from_sql)
            .and_then(pick)
            .map(Outcome::Replayed)
            .ok_or_else(|| {
                tracing::error!(
                    key = %once.key,
                    answer = ?answer,
                    "an idempotency record holds no answer this write can replay"
                );
                Error::internal(
                    "the idempotency record of this key holds no answer this write can replay",
                )
            }),
        Claimed::Vanished => {
            tracing::error!(key = %once.key, "an idempotency record vanished while locked");
            Err(Error::internal(
                "the idempotency record of this key vanished while it was read",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn once(fp: &str) -> Once {
        Once {
            key: "k".into(),
            fingerprint: fp.into(),
            retention: Duration::from_secs(10),
        }
    }

    fn deleted(a: Answer) -> Option<bool> {
        match a {
            Answer::Deleted(d) => Some(d),
            Answer::Put => None,
        }
    }

    fn held(fp: &str, answer: Option<&str>) -> Claimed {
        Claimed::Held {
            fingerprint: fp.into(),
            answer: answer.map(String::from),
        }
    }

    #[test]
    fn answers_round_trip_through_their_column() {
        for a in [Answer::Put, Answer::Deleted(true), Answer::Deleted(false)] {
            assert_eq!(Answer::from_sql(a.to_sql()), Some(a));
        }
        assert_eq!(Answer::from_sql(""), None);
    }

    #[test]
    fn outcomes_from_what_the_transaction_found() {
        let o = once("fp");
        assert_eq!(
            outcome(Claimed::Ran(Answer::Deleted(false)), &o, deleted).unwrap(),
            Outcome::Executed(false)
        );
        assert_eq!(
            outcome(held("fp", Some("deleted")), &o, deleted).unwrap(),
            Outcome::Replayed(true)
        );
        assert_eq!(
            outcome(held("other", Some("deleted")), &o, deleted).unwrap(),
            Outcome::Reused
        );
        for bad in [
            held("fp", None),
            held("fp", Some("put")),
            held("fp", Some("?")),
            Claimed::Vanished,
        ] {
            assert!(
                matches!(outcome(bad.clone(), &o, deleted), Err(Error::Internal(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn retention_is_bounded() {
        assert!(crate::ttl_micros(Duration::MAX.min(MAX_RETENTION)) < i64::MAX / 2);
    }
}
