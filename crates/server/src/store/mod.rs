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

/// The fleet's state as `/metrics` shows it.
#[derive(Debug, Clone, Default)]
pub struct FleetGauges {
    pub devices: i64,
    pub online: i64,
    /// (state, count) per command state present.
    pub commands: Vec<(String, i64)>,
    pub rollouts: Vec<(String, i64)>,
    /// The earliest `not after` of an unblocked device's current certificate, in Unix ms.
    pub first_cert_expiry_ms: Option<i64>,
    /// Unblocked devices holding a certificate.
    pub device_certificates: i64,
}

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

    /// What `/metrics` reads from the database: one read transaction, so the figures agree.
    pub async fn fleet_gauges(&self) -> sqlx::Result<FleetGauges> {
        let mut tx = self.pool.begin().await?;
        let (devices, online): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(online), 0) FROM devices")
                .fetch_one(&mut *tx)
                .await?;
        let commands =
            sqlx::query_as("SELECT state, COUNT(*) FROM commands GROUP BY state ORDER BY state")
                .fetch_all(&mut *tx)
                .await?;
        let rollouts =
            sqlx::query_as("SELECT state, COUNT(*) FROM rollouts GROUP BY state ORDER BY state")
                .fetch_all(&mut *tx)
                .await?;
        let (first_cert_expiry_ms, device_certificates) = sqlx::query_as(
            "SELECT MIN(cert_not_after), COUNT(*) FROM devices WHERE blocked = 0 AND cert_serial IS NOT NULL",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(FleetGauges {
            devices,
            online,
            commands,
            rollouts,
            first_cert_expiry_ms,
            device_certificates,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's plan for a statement, one detail line each ("SCAN t" is a full scan).
    async fn plan(store: &Store, sql: &str) -> Vec<String> {
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain);
        for _ in 0..sql.matches('?').count() {
            q = q.bind(50_i64);
        }
        let rows = q.fetch_all(&store.pool).await.unwrap();
        rows.into_iter().map(|r| r.3).collect()
    }

    #[tokio::test]
    async fn the_half_second_sweeps_and_the_audit_filter_use_their_indexes_not_full_scans() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        // A fleet's worth of rows: on near-empty tables SQLite rightly prefers a scan.
        sqlx::raw_sql(
            "INSERT INTO users (username, email, password_hash, role, created_at) VALUES ('o', 'o@x', 'h', 'admin', 0);
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 5000)
             INSERT INTO devices (device_id, owner_id, name, online, last_seen, created_at) SELECT 'd' || k, 1, 'd', k % 2, k, 0 FROM n;
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 20000)
             INSERT INTO commands (id, device_id, name, args, state, created_at, expires_at) SELECT 'c' || k, 'd' || (k % 5000), 'led', '{}', CASE WHEN k % 100 = 0 THEN 'queued' ELSE 'succeeded' END, k, k FROM n;
             WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 20000)
             INSERT INTO audit (at, actor, action, result) SELECT k, 'a', 'action.' || (k % 40), 'success' FROM n;
",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        for (sql, index) in [
            (commands::OPEN_COMMAND_DUE, "commands_expiry"),
            (devices::SILENT_DEVICE_EXISTS, "devices_presence"),
            (audit::AUDIT_BY_ACTION, "audit_action"),
        ] {
            let plan = plan(&store, sql).await;
            assert!(
                plan.iter().all(|step| !step.starts_with("SCAN"))
                    && plan.iter().any(|s| s.contains(index)),
                "{sql}: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn sweeps_with_nothing_to_do_never_wait_for_the_write_lock() {
        use sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open_with_busy_timeout(&path, Duration::from_millis(50))
            .await
            .unwrap();
        let mut writer = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut writer)
            .await
            .unwrap();
        // A write here would fail with SQLITE_BUSY after 50 ms.
        assert_eq!(store.expire_commands().await.unwrap(), 0);
        assert!(
            store
                .expire_silent_devices(now_ms())
                .await
                .unwrap()
                .is_empty()
        );
        sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    }
}
