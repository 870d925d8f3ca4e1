//! The table, its migrations, and the SQL of every operation.
//!
//! ```sql
//! CREATE TABLE <table> (
//!     namespace  text COLLATE "C" NOT NULL,
//!     key        text COLLATE "C" NOT NULL,   -- "C": byte order, as List promises
//!     value      bytea            NOT NULL,
//!     expires_at timestamptz,                 -- NULL: never expires
//!     PRIMARY KEY (namespace, key)
//! );
//! CREATE INDEX <table>_expires_at ON <table> (expires_at) WHERE expires_at IS NOT NULL;
//!
//! CREATE TABLE <table>_idempotency (           -- idempotency records (version 2)
//!     namespace   text COLLATE "C" NOT NULL,
//!     key         text COLLATE "C" NOT NULL,   -- the client's idempotency key
//!     fingerprint text             NOT NULL,   -- of the first request with the key
//!     answer      text,                        -- what it answered; see records.rs
//!     expires_at  timestamptz      NOT NULL,   -- the end of the retention
//!     PRIMARY KEY (namespace, key)
//! );
//! CREATE INDEX <table>_idem_expiry ON <table>_idempotency (expires_at);
//!
//! CREATE TABLE trellis_schema_version (        -- one row per data table
//!     table_name text PRIMARY KEY,
//!     version    integer NOT NULL,
//!     updated_at timestamptz NOT NULL DEFAULT now()
//! );
//! ```
//!
//! Migrations are numbered steps ([`MIGRATIONS`]); on start the pattern
//! applies the ones after the recorded version, in one transaction, under
//! an advisory lock so patterns starting together do not race. A table at
//! a newer version than this build knows is refused, not downgraded.

use pattern_sdk::{Error, FieldViolation};

/// Serializes migrations of every trellis-postgres table in one database.
const MIGRATION_LOCK: i64 = 0x0074_7265_6c6c_6973; // "trellis" in ASCII

/// The longest table name: the longest name made from it
/// (`<table>_idempotency`, `<table>_idem_expiry`) adds 12 characters and
/// PostgreSQL truncates identifiers past 63.
pub const MAX_TABLE_NAME: usize = 48;

/// The table of idempotency records that goes with the data table `table`.
pub fn records_table(table: &str) -> String {
    format!("{table}_idempotency")
}

/// Checks a table name: a plain lowercase SQL identifier, so it can be
/// written into SQL without quoting surprises.
pub fn validate_table(name: &str) -> Result<(), FieldViolation> {
    let mut chars = name.chars();
    let ok_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok_start && ok_rest && name.len() <= MAX_TABLE_NAME {
        Ok(())
    } else {
        Err(FieldViolation::new(
            "config.table",
            format!(
                "{name:?} is not a valid table name; allowed: 1 to {MAX_TABLE_NAME} \
                 characters: lowercase letters, digits and '_', not starting with a digit"
            ),
        ))
    }
}

/// Migration `i` takes a table from version `i` to `i + 1`.
pub fn migrations(table: &str) -> Vec<String> {
    let records = records_table(table);
    vec![
        format!(
            r#"CREATE TABLE IF NOT EXISTS {table} (
    namespace  text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    value      bytea            NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at) WHERE expires_at IS NOT NULL;
COMMENT ON TABLE {table} IS 'trellis-postgres key-value data; schema version in trellis_schema_version';"#
        ),
        // 2: idempotency records. `answer` is NULL only inside the
        // transaction that claimed the key, so never in a committed record.
        format!(
            r#"CREATE TABLE IF NOT EXISTS {records} (
    namespace   text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    fingerprint text             NOT NULL,
    answer      text,
    expires_at  timestamptz      NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS {table}_idem_expiry ON {records} (expires_at);
COMMENT ON TABLE {records} IS 'trellis-postgres idempotency records of table {table}; purged after expires_at';"#
        ),
    ]
}

/// Brings `table` to the latest version. Returns the version found before.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    table: &str,
) -> Result<i32, MigrateError> {
    let steps = migrations(table);
    let latest = steps.len() as i32;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS trellis_schema_version (
            table_name text PRIMARY KEY,
            version    integer NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let found: i32 = tx
        .query_opt(
            "SELECT version FROM trellis_schema_version WHERE table_name = $1",
            &[&table],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?
        .unwrap_or(0);
    if found > latest {
        return Err(MigrateError::TooNew { found, latest });
    }
    for step in steps.iter().skip(found.max(0) as usize) {
        tx.batch_execute(step).await?;
    }
    tx.execute(
        "INSERT INTO trellis_schema_version (table_name, version) VALUES ($1, $2)
         ON CONFLICT (table_name) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
        &[&table, &latest],
    )
    .await?;
    tx.commit().await?;
    Ok(found)
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the table is at schema version {found}, newer than this trellis-postgres knows \
         ({latest}); run a newer trellis-postgres, or point config.table at another table"
    )]
    TooNew { found: i32, latest: i32 },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

impl From<MigrateError> for Error {
    fn from(e: MigrateError) -> Self {
        match e {
            too_new @ MigrateError::TooNew { .. } => {
                Error::failed_precondition(too_new.to_string())
            }
            MigrateError::Db(e) => crate::errors::convert(&e, "creating or migrating the table"),
        }
    }
}

/// The SQL of each operation, with the table name filled in.
#[derive(Debug, Clone)]
pub struct Queries {
    pub get: String,
    pub put: String,
    pub delete: String,
    pub list: String,
    pub purge: String,
    /// Claims an idempotency key: inserts its record, or takes over an
    /// expired one; returns a row only then. A live record is left alone
    /// (but locked until the transaction ends).
    pub claim: String,
    /// The fingerprint and answer of a key's record.
    pub recorded: String,
    /// Stores the answer in the record the transaction claimed.
    pub record: String,
    /// Deletes expired idempotency records, like `purge`.
    pub purge_records: String,
}

/// How many expired rows one purge statement removes at most.
pub const PURGE_BATCH: i64 = 1000;

impl Queries {
    pub fn new(table: &str) -> Self {
        let records = records_table(table);
        Self {
            get: format!(
                "SELECT value FROM {table} WHERE namespace = $1 AND key = $2 \
                 AND (expires_at IS NULL OR expires_at > now())"
            ),
            // $4: the TTL in microseconds, NULL for none.
            put: format!(
                "INSERT INTO {table} (namespace, key, value, expires_at) \
                 VALUES ($1, $2, $3, now() + $4::bigint * interval '1 microsecond') \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at"
            ),
            delete: format!(
                "DELETE FROM {table} WHERE namespace = $1 AND key = $2 \
                 RETURNING (expires_at IS NULL OR expires_at > now())"
            ),
            // $2: the prefix (lower bound), $3: its successor (upper bound,
            // NULL for none), $4: the last key of the previous page ('' for
            // the first), $5: how many rows.
            list: format!(
                "SELECT key, value FROM {table} \
                 WHERE namespace = $1 AND key >= $2 AND ($3::text IS NULL OR key < $3::text) \
                 AND key > $4 AND (expires_at IS NULL OR expires_at > now()) \
                 ORDER BY key LIMIT $5"
            ),
            purge: format!(
                "DELETE FROM {table} WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM {table} WHERE expires_at <= now() LIMIT {PURGE_BATCH}))"
            ),
            // $3: the fingerprint, $4: the retention in microseconds.
            claim: format!(
                "INSERT INTO {records} AS r (namespace, key, fingerprint, answer, expires_at) \
                 VALUES ($1, $2, $3, NULL, now() + $4::bigint * interval '1 microsecond') \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET fingerprint = EXCLUDED.fingerprint, answer = NULL, \
                 expires_at = EXCLUDED.expires_at \
                 WHERE r.expires_at <= now() \
                 RETURNING true"
            ),
            recorded: format!(
                "SELECT fingerprint, answer FROM {records} WHERE namespace = $1 AND key = $2"
            ),
            // $3: the answer.
            record: format!("UPDATE {records} SET answer = $3 WHERE namespace = $1 AND key = $2"),
            // A record a claim takes over (updates) while the purge waits
            // for its lock must survive: PostgreSQL rechecks the ctid on the
            // row's new version (seen on 15), and the outer `expires_at <=
            // now()`, checked on that version too, makes sure of it.
            purge_records: format!(
                "DELETE FROM {records} WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM {records} WHERE expires_at <= now() LIMIT {PURGE_BATCH})) \
                 AND expires_at <= now()"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        for ok in ["trellis_kv", "_t", "kv2", &"a".repeat(MAX_TABLE_NAME)] {
            assert!(validate_table(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "2kv",
            "KV",
            "kv-1",
            "kv; DROP TABLE x",
            "\"kv\"",
            "public.kv",
            &"a".repeat(MAX_TABLE_NAME + 1),
        ] {
            let v = validate_table(bad).unwrap_err();
            assert_eq!(v.field, "config.table");
        }
    }

    #[test]
    fn queries_name_the_table() {
        let q = Queries::new("my_kv");
        for sql in [&q.get, &q.put, &q.delete, &q.list, &q.purge] {
            assert!(sql.contains("my_kv"), "{sql}");
        }
        assert!(migrations("my_kv")[0].contains("COLLATE \"C\""));
    }

    #[test]
    fn records_queries_name_the_records_table_within_the_identifier_limit() {
        let q = Queries::new("my_kv");
        for sql in [&q.claim, &q.recorded, &q.record, &q.purge_records] {
            assert!(sql.contains("my_kv_idempotency"), "{sql}");
        }
        let longest = "a".repeat(MAX_TABLE_NAME);
        let step = &migrations(&longest)[1];
        for name in [records_table(&longest), format!("{longest}_idem_expiry")] {
            assert!(name.len() <= 63, "{name}");
            assert!(step.contains(&name), "{step}");
        }
    }
}
