//! The database a test server runs on: its SQLite file by default, or, with
//! `FLOTILLA_E2E_DATABASE=postgres`, a fresh PostgreSQL database on the local server that the
//! test creates and drops. Tests that reach into the database (fault injection, counting rows)
//! do it through [`Database`], so the same test runs on either.

use std::path::PathBuf;

use anyhow::Result;
use sqlx::Connection;

/// Whether this run puts test servers on PostgreSQL.
pub fn postgres_mode() -> bool {
    std::env::var("FLOTILLA_E2E_DATABASE").is_ok_and(|v| v == "postgres")
}

pub enum Database {
    Sqlite(PathBuf),
    /// A database of this test's own, dropped with it.
    Postgres(flotilla_pgtest::TempDatabase),
    /// Another server's PostgreSQL database (a second replica's view of it), by URL; the
    /// server that made it drops it.
    SharedPostgres(String),
}

impl Database {
    /// The database for a server whose data dir is `data_dir`.
    pub async fn for_server(data_dir: PathBuf) -> Result<Database> {
        if !postgres_mode() {
            return Ok(Database::Sqlite(data_dir.join("flotilla.db")));
        }
        Self::postgres().await
    }

    /// A fresh PostgreSQL database, whatever the run's mode: for tests that need what only
    /// PostgreSQL offers (locks on one table).
    pub async fn postgres() -> Result<Database> {
        let database = flotilla_pgtest::TempDatabase::create("flotilla_e2e_")
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(Database::Postgres(database))
    }

    /// What the server takes as `--database-url`.
    pub fn url(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres(database) => database.url().to_string(),
            Database::SharedPostgres(url) => url.clone(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres(_) | Database::SharedPostgres(_))
    }

    /// A connection of the test's own (statements with `$N` parameters run on both).
    pub async fn connect(&self) -> Result<sqlx::AnyConnection> {
        sqlx::any::install_default_drivers();
        Ok(sqlx::AnyConnection::connect(&self.url()).await?)
    }

    /// Holds the write lock the server's commits need until the returned connection commits
    /// or drops (`flotilla_pgtest::faults::lock_writes`).
    pub async fn lock_writes(&self) -> Result<sqlx::AnyConnection> {
        self.holding(flotilla_pgtest::faults::lock_writes(self.is_postgres()))
            .await
    }

    /// Stalls the ingest of telemetry (PostgreSQL only) until the returned connection commits
    /// or drops ([`Database::wait_for_a_waiting_query`] tells when the writer waits for it).
    pub async fn stall_telemetry(&self) -> Result<sqlx::AnyConnection> {
        anyhow::ensure!(self.is_postgres(), "only PostgreSQL locks one table");
        self.holding(flotilla_pgtest::faults::STALL_TELEMETRY).await
    }

    /// A connection of the test's own that has run `statements` (and holds what they took).
    async fn holding(&self, statements: &[&str]) -> Result<sqlx::AnyConnection> {
        let mut conn = self.connect().await?;
        for sql in statements {
            sqlx::raw_sql(sql).execute(&mut conn).await?;
        }
        Ok(conn)
    }

    /// Waits until a query of the server waits for a lock (PostgreSQL).
    pub async fn wait_for_a_waiting_query(&self) -> Result<()> {
        let mut conn = self.connect().await?;
        for _ in 0..200 {
            let waiting: i64 =
                sqlx::query_scalar(flotilla_pgtest::faults::QUERIES_WAITING_FOR_A_LOCK)
                    .fetch_one(&mut conn)
                    .await?;
            if waiting > 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!("no query waited for a lock within 10 s")
    }

    /// Makes the database refuse, forever, the telemetry reading `seq` of `device`.
    pub async fn poison_reading(&self, device: &str, seq: u64) -> Result<()> {
        let mut conn = self.connect().await?;
        let condition = format!("NEW.device_id = '{device}' AND NEW.seq = {seq}");
        for sql in flotilla_pgtest::faults::refuse_readings_where(self.is_postgres(), &condition) {
            sqlx::raw_sql(&sql).execute(&mut conn).await?;
        }
        Ok(conn.close().await?)
    }

    /// Updates of `rollout` by (state, error), with how many of each: what a bench reports
    /// of the devices that did not succeed.
    pub async fn updates_by_outcome(&self, rollout: &str) -> Result<Vec<(String, String, i64)>> {
        let mut conn = self.connect().await?;
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT state, COALESCE(error, ''), COUNT(*) FROM ota_updates WHERE rollout_id = $1 \
             GROUP BY state, COALESCE(error, '') ORDER BY COUNT(*) DESC",
        )
        .bind(rollout)
        .fetch_all(&mut conn)
        .await?;
        conn.close().await?;
        Ok(rows)
    }

    /// Every stored telemetry (device, seq), duplicates included.
    pub async fn stored_readings(&self) -> Result<Vec<(String, u64)>> {
        let mut conn = self.connect().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT device_id, seq FROM telemetry")
            .fetch_all(&mut conn)
            .await?;
        conn.close().await?;
        Ok(rows.into_iter().map(|(d, s)| (d, s as u64)).collect())
    }
}
