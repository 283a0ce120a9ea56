//! Removing what is old enough, in small batches (each its own short transaction, so ingest
//! waits at most one batch for the write lock), and the figures `/api/admin/stats` shows.
//! Deleting is idempotent, so it needs no lease fence: two servers that both run it remove
//! the same rows once. The audit log is removed through [`Store::add_audit_checkpoint`].

use serde::Serialize;

use super::{Backend, Store, StoreResult};
use flotilla_proto::DeviceId;

/// A kind of row retention removes by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionKind {
    /// Readings, by when they were received.
    Telemetry,
    /// OTA status reports, by when they arrived.
    OtaEvents,
    /// Succeeded, failed or expired commands, by when they finished.
    FinishedCommands,
    /// Provisioning tokens, used or not, by when they expired.
    SpentTokens,
    /// Messages that could not be stored, by when they arrived.
    DeadLetters,
}

impl RetentionKind {
    pub const ALL: [RetentionKind; 5] = [
        RetentionKind::Telemetry,
        RetentionKind::OtaEvents,
        RetentionKind::FinishedCommands,
        RetentionKind::SpentTokens,
        RetentionKind::DeadLetters,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetentionKind::Telemetry => "telemetry",
            RetentionKind::OtaEvents => "otaEvents",
            RetentionKind::FinishedCommands => "finishedCommands",
            RetentionKind::SpentTokens => "spentTokens",
            RetentionKind::DeadLetters => "deadLetters",
        }
    }

    /// Deletes up to `$2` rows older than `$1`, through the index on the age column.
    fn delete_batch(self) -> &'static str {
        match self {
            RetentionKind::Telemetry => {
                "DELETE FROM telemetry WHERE (device_id, seq) IN \
                 (SELECT device_id, seq FROM telemetry WHERE received_at < $1 LIMIT $2)"
            }
            RetentionKind::OtaEvents => {
                "DELETE FROM ota_events WHERE id IN (SELECT id FROM ota_events WHERE at < $1 LIMIT $2)"
            }
            RetentionKind::FinishedCommands => {
                "DELETE FROM commands WHERE id IN \
                 (SELECT id FROM commands WHERE completed_at < $1 LIMIT $2)"
            }
            RetentionKind::SpentTokens => {
                "DELETE FROM provisioning_tokens WHERE token_hash IN \
                 (SELECT token_hash FROM provisioning_tokens WHERE expires_at < $1 LIMIT $2)"
            }
            RetentionKind::DeadLetters => {
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE at < $1 LIMIT $2)"
            }
        }
    }
}

/// What the last retention run of one kind removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionRun {
    pub kind: String,
    pub at: i64,
    pub deleted: i64,
    /// Removed by every run so far.
    pub total_deleted: i64,
}

/// Rows and bytes, for `/api/admin/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageFigures {
    pub telemetry_rows: i64,
    pub ota_events: i64,
    pub commands: i64,
    pub provisioning_tokens: i64,
    pub dead_letters: i64,
    pub audit_records: i64,
    pub audit_checkpoints: i64,
    /// The whole database: SQLite's pages, PostgreSQL's `pg_database_size`.
    pub database_bytes: i64,
    pub retention: Vec<RetentionRun>,
}

impl Store {
    /// Deletes up to `batch` rows of `kind` older than `before_ms`; returns how many it did.
    pub async fn delete_expired(
        &self,
        kind: RetentionKind,
        before_ms: i64,
        batch: i64,
    ) -> StoreResult<u64> {
        let mut conn = self.pool.acquire().await?;
        delete_expired_in(&mut conn, kind, before_ms, batch).await
    }

    /// Up to `limit` devices after `after` in id order, for walking the fleet in pages.
    pub async fn device_ids_after(
        &self,
        after: Option<&DeviceId>,
        limit: i64,
    ) -> StoreResult<Vec<DeviceId>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT device_id FROM devices WHERE device_id > $1 ORDER BY device_id LIMIT $2",
        )
        .bind(after.map_or("", |d| d.as_str()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        ids.into_iter()
            .map(|id| super::parse_device_id(&id))
            .collect()
    }

    /// Deletes up to `batch` of `device`'s readings that are not among its newest `keep`
    /// sequence numbers (seq > newest − keep stays), so at most `keep` readings remain. The
    /// numbers are the device's own: a device that jumps its seq ahead loses its older
    /// readings sooner, never another device's. A device under the cap costs one indexed read
    /// and no write.
    pub async fn trim_device_telemetry(
        &self,
        device: &DeviceId,
        keep: u64,
        batch: i64,
    ) -> StoreResult<u64> {
        let mut conn = self.pool.acquire().await?;
        trim_device_telemetry_in(&mut conn, device, keep, batch).await
    }

    /// Keeps what a run of `kind` removed.
    pub async fn record_retention_run(&self, kind: &str, at: i64, deleted: u64) -> StoreResult<()> {
        let deleted = i64::try_from(deleted).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO retention_runs (kind, at, deleted, total_deleted) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (kind) DO UPDATE SET at = excluded.at, deleted = excluded.deleted, \
             total_deleted = retention_runs.total_deleted + excluded.deleted",
        )
        .bind(kind)
        .bind(at)
        .bind(deleted)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn storage_figures(&self) -> StoreResult<StorageFigures> {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.pool)
                .await
        };
        let database_bytes = match self.backend {
            Backend::Sqlite => {
                count("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
                    .await?
            }
            Backend::Postgres => {
                count("SELECT CAST(pg_database_size(current_database()) AS BIGINT)").await?
            }
        };
        let runs: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT kind, at, deleted, total_deleted FROM retention_runs ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(StorageFigures {
            telemetry_rows: count("SELECT COUNT(*) FROM telemetry").await?,
            ota_events: count("SELECT COUNT(*) FROM ota_events").await?,
            commands: count("SELECT COUNT(*) FROM commands").await?,
            provisioning_tokens: count("SELECT COUNT(*) FROM provisioning_tokens").await?,
            dead_letters: count("SELECT COUNT(*) FROM dead_letters").await?,
            audit_records: count("SELECT COUNT(*) FROM audit").await?,
            audit_checkpoints: count("SELECT COUNT(*) FROM audit_checkpoints").await?,
            database_bytes,
            retention: runs
                .into_iter()
                .map(|(kind, at, deleted, total_deleted)| RetentionRun {
                    kind,
                    at,
                    deleted,
                    total_deleted,
                })
                .collect(),
        })
    }
}

/// Deletes up to `batch` rows of `kind` older than `before_ms` through `conn` (the pool's or
/// a fenced transaction's); how many.
pub(super) async fn delete_expired_in(
    conn: &mut sqlx::AnyConnection,
    kind: RetentionKind,
    before_ms: i64,
    batch: i64,
) -> StoreResult<u64> {
    Ok(sqlx::query(kind.delete_batch())
        .bind(before_ms)
        .bind(batch)
        .execute(&mut *conn)
        .await?
        .rows_affected())
}

/// Deletes up to `batch` of `device`'s oldest readings beyond the newest `keep`, through `conn`.
pub(super) async fn trim_device_telemetry_in(
    conn: &mut sqlx::AnyConnection,
    device: &DeviceId,
    keep: u64,
    batch: i64,
) -> StoreResult<u64> {
    let (oldest, newest): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT MIN(seq), MAX(seq) FROM telemetry WHERE device_id = $1")
            .bind(device.as_str())
            .fetch_one(&mut *conn)
            .await?;
    let below = newest.and_then(|n| n.checked_sub(i64::try_from(keep).ok()?));
    let (Some(oldest), Some(below)) = (oldest, below) else {
        return Ok(0);
    };
    if oldest > below {
        return Ok(0);
    }
    Ok(sqlx::query(
        "DELETE FROM telemetry WHERE (device_id, seq) IN \
         (SELECT device_id, seq FROM telemetry WHERE device_id = $1 AND seq <= $2 LIMIT $3)",
    )
    .bind(device.as_str())
    .bind(below)
    .bind(batch)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}
