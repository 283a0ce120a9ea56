//! The database a test server runs on: its SQLite file by default, or, with
//! `FLOTILLA_E2E_DATABASE=postgres`, a fresh PostgreSQL database on the local server that the
//! test creates and drops. Tests that reach into the database (fault injection, counting rows)
//! do it through [`Database`], so the same test runs on either.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use sqlx::Connection;

/// Whether this run puts test servers on PostgreSQL.
pub fn postgres_mode() -> bool {
    std::env::var("FLOTILLA_E2E_DATABASE").is_ok_and(|v| v == "postgres")
}

/// The PostgreSQL server test databases are made on (`FLOTILLA_TEST_POSTGRES` to override).
fn admin_url() -> String {
    std::env::var("FLOTILLA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub enum Database {
    Sqlite(PathBuf),
    /// A database of this test's own, dropped with it.
    Postgres {
        name: String,
        url: String,
    },
}

impl Database {
    /// The database for a server whose data dir is `data_dir`.
    pub async fn for_server(data_dir: PathBuf) -> Result<Database> {
        if !postgres_mode() {
            return Ok(Database::Sqlite(data_dir.join("flotilla.db")));
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flotilla_e2e_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .with_context(|| format!("PostgreSQL at {admin} (set FLOTILLA_TEST_POSTGRES)"))?;
        drop_abandoned(&mut conn).await;
        // One statement each: DROP/CREATE DATABASE may not run inside a transaction. An ICU
        // collation that does not sort bytewise, as many production databases have.
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await?;
        sqlx::raw_sql(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        ))
        .execute(&mut conn)
        .await?;
        let (base, _) = admin.rsplit_once('/').context("a database in the URL")?;
        let url = format!("{base}/{name}");
        Ok(Database::Postgres { name, url })
    }

    /// What the server takes as `--database-url`.
    pub fn url(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("sqlite://{}", path.display()),
            Database::Postgres { url, .. } => url.clone(),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres { .. })
    }

    /// A connection of the test's own (statements with `$N` parameters run on both).
    pub async fn connect(&self) -> Result<sqlx::AnyConnection> {
        sqlx::any::install_default_drivers();
        Ok(sqlx::AnyConnection::connect(&self.url()).await?)
    }

    /// Holds the write lock the server's commits need until the returned connection commits
    /// or drops: SQLite's `BEGIN IMMEDIATE`; on PostgreSQL, locks that block writes to the
    /// tables ingest writes while reads go on.
    pub async fn lock_writes(&self) -> Result<sqlx::AnyConnection> {
        let mut conn = self.connect().await?;
        let statements: &[&str] = if self.is_postgres() {
            &["BEGIN", "LOCK TABLE telemetry, devices IN EXCLUSIVE MODE"]
        } else {
            &["BEGIN IMMEDIATE"]
        };
        for sql in statements {
            sqlx::raw_sql(sql).execute(&mut conn).await?;
        }
        Ok(conn)
    }

    /// Makes the database refuse, forever, the telemetry reading `seq` of `device`.
    pub async fn poison_reading(&self, device: &str, seq: u64) -> Result<()> {
        let mut conn = self.connect().await?;
        let condition = format!("NEW.device_id = '{device}' AND NEW.seq = {seq}");
        if self.is_postgres() {
            sqlx::raw_sql(&format!(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 IF {condition} THEN RAISE EXCEPTION 'poisoned reading'; END IF; RETURN NEW; END $$"
            ))
            .execute(&mut conn)
            .await?;
            sqlx::raw_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION poison()",
            )
            .execute(&mut conn)
            .await?;
        } else {
            sqlx::raw_sql(&format!(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN {condition} \
                 BEGIN SELECT RAISE(ABORT, 'poisoned reading'); END"
            ))
            .execute(&mut conn)
            .await?;
        }
        Ok(conn.close().await?)
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

/// Drops the databases of test processes that no longer run (killed before their drop).
async fn drop_abandoned(conn: &mut sqlx::PgConnection) {
    const PREFIX: &str = "flotilla_e2e_";
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(PREFIX)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name[PREFIX.len()..]
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut *conn)
                .await;
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let Database::Postgres { name, .. } = self else {
            return;
        };
        let (name, admin) = (name.clone(), admin_url());
        // Drop may run inside a runtime, which cannot block on another: a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}
