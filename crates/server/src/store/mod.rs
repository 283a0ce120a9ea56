//! Persistence: one SQLite file in the data dir (WAL, synchronous=FULL so a commit is on disk
//! before anything is acknowledged). Portable SQL, integer millisecond timestamps.

mod audit;
mod commands;
mod devices;
mod ingest;
mod migrations;
mod ota;
mod releases;
mod rollouts;
mod tokens;
mod users;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use audit::{AuditEntry, AuditRecord};
pub use commands::CommandRow;
pub use devices::{DeviceRow, DeviceUpdate, TelemetryRow};
pub(crate) use devices::{apply_readings, apply_update};
pub(crate) use ota::apply_ota_status;
pub use ota::{Finished, UpdateRow, UpdateState};
pub use releases::{NewRelease, ReleaseRow};
pub use rollouts::RolloutRow;
pub use tokens::TokenClaim;
pub use users::{Role, UserChange, UserRow};

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    pub async fn open(path: &Path) -> anyhow::Result<Store> {
        Store::open_with_busy_timeout(path, Duration::from_secs(10)).await
    }

    /// [`Store::open`] with another wait for a database another writer holds.
    pub async fn open_with_busy_timeout(path: &Path, busy: Duration) -> anyhow::Result<Store> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(busy);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .with_context(|| format!("opening database {}", path.display()))?;
        migrations::run(&pool).await.context("running migrations")?;
        Ok(Store { pool })
    }

    /// Fleet-wide counts for operators and benchmarks.
    pub async fn stats(&self) -> sqlx::Result<serde_json::Value> {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.pool)
                .await
        };
        Ok(serde_json::json!({
            "users": count("SELECT COUNT(*) FROM users").await?,
            "devices": count("SELECT COUNT(*) FROM devices").await?,
            "online": count("SELECT COUNT(*) FROM devices WHERE online = 1").await?,
            "telemetryRows": count("SELECT COUNT(*) FROM telemetry").await?,
            "commands": count("SELECT COUNT(*) FROM commands").await?,
        }))
    }
}
