//! The writes, on a pooled connection (autocommit, one statement) or inside
//! a keyed write's transaction (`records.rs`): the same SQL either way.

use deadpool_postgres::GenericClient;
use tokio_postgres::Error;

/// Upserts `value` under `(namespace, key)`; `ttl` in microseconds, `None`
/// for no expiry.
pub async fn put(
    client: &impl GenericClient,
    sql: &str,
    namespace: &str,
    key: &str,
    value: &[u8],
    ttl: Option<i64>,
) -> Result<(), Error> {
    let stmt = client.prepare_cached(sql).await?;
    client
        .execute(&stmt, &[&namespace, &key, &value, &ttl])
        .await
        .map(|_| ())
}

/// Deletes `(namespace, key)`: whether a live (unexpired) row was removed.
pub async fn delete(
    client: &impl GenericClient,
    sql: &str,
    namespace: &str,
    key: &str,
) -> Result<bool, Error> {
    let stmt = client.prepare_cached(sql).await?;
    let row = client.query_opt(&stmt, &[&namespace, &key]).await?;
    row.map(|r| r.try_get::<_, bool>(0))
        .transpose()
        .map(|live| live.unwrap_or(false))
}
