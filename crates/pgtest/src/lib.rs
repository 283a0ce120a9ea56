//! Throwaway PostgreSQL databases for tests: each test makes its own on a server it may create
//! databases on, and the database is dropped with the value. The server is the local one
//! (`postgres://postgres@127.0.0.1:5432/test`, trust auth) unless `FLOTILLA_TEST_POSTGRES`
//! names another.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

/// The server test databases are made on.
pub fn admin_url() -> String {
    std::env::var("FLOTILLA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of this test's own; dropped (connections and all) when this is.
#[derive(Debug)]
pub struct TempDatabase {
    name: String,
    url: String,
}

impl TempDatabase {
    /// A fresh, empty database named `<prefix><pid>_<n>`. Its default collation is ICU
    /// `en-US`, which does not sort bytewise, as many production databases do not: a listing
    /// that relies on the database's order shows it.
    pub async fn create(prefix: &str) -> Result<TempDatabase, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        if !prefix.starts_with(|c: char| c.is_ascii_lowercase()) || !prefix.bytes().all(plain) {
            return Err(format!(
                "a database prefix is a lower-case letter, then letters, digits and '_': {prefix:?}"
            ));
        }
        // A random part too, so runs sharing one server never pick the same name.
        let name = format!(
            "{prefix}{}_{}_{:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand_u32()
        );
        let admin = admin_url();
        let url = with_database(&admin, &name)?;
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .map_err(|e| format!("no PostgreSQL for tests (set FLOTILLA_TEST_POSTGRES): {e}"))?;
        // Only on the local default server: elsewhere process ids say nothing about who
        // owns a database.
        if std::env::var_os("FLOTILLA_TEST_POSTGRES").is_none() {
            drop_abandoned(&mut conn, prefix).await;
        }
        // Not inside a transaction (CREATE DATABASE may not run in one).
        sqlx::raw_sql(&format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu \
             ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        ))
        .execute(&mut conn)
        .await
        .map_err(|e| format!("creating test database {name}: {e}"))?;
        Ok(TempDatabase { name, url })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// `url` naming database `name` instead, its query kept.
fn with_database(url: &str, name: &str) -> Result<String, String> {
    let (before_query, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let (base, _) = before_query
        .rsplit_once('/')
        .filter(|(base, _)| base.contains("://") && !base.ends_with('/'))
        .ok_or("FLOTILLA_TEST_POSTGRES needs a database, as in postgres://u@host/db")?;
    Ok(match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    })
}

/// Not cryptographic: only to keep names apart.
fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

/// Drops the databases with `prefix` whose test process no longer runs (killed before its
/// own drop).
async fn drop_abandoned(conn: &mut sqlx::PgConnection, prefix: &str) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(prefix)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        // Only names this crate makes: the prefix, then digits, '_' and hex.
        let tail = &name[prefix.len()..];
        if !tail.bytes().all(|b| b.is_ascii_hexdigit() || b == b'_') {
            continue;
        }
        let pid = tail.split('_').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            drop_database(conn, &name).await;
        }
    }
}

async fn drop_database(conn: &mut sqlx::PgConnection, name: &str) {
    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(conn)
        .await;
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        // Drop may run inside a runtime, which cannot block on another: a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                    drop_database(&mut conn, &name).await;
                }
            });
        })
        .join();
    }
}

/// Fault-injection SQL for a test database of either engine, so the store's tests and the
/// end-to-end harness inject the same faults.
pub mod faults {
    /// Statements that take the write lock ingest's commits need, held until the
    /// connection commits or closes: SQLite's `BEGIN IMMEDIATE`; on PostgreSQL, locks that
    /// block writes to the tables ingest writes while reads go on.
    pub fn lock_writes(postgres: bool) -> &'static [&'static str] {
        if postgres {
            &["BEGIN", "LOCK TABLE telemetry, devices IN EXCLUSIVE MODE"]
        } else {
            &["BEGIN IMMEDIATE"]
        }
    }

    /// Statements that stall the ingest of telemetry alone on PostgreSQL (other tables stay
    /// writable), held until the connection commits or closes.
    pub const STALL_TELEMETRY: &[&str] = &["BEGIN", "LOCK TABLE telemetry IN EXCLUSIVE MODE"];

    /// How many queries of this database wait for a lock now (PostgreSQL).
    pub const QUERIES_WAITING_FOR_A_LOCK: &str = "SELECT COUNT(*) FROM pg_stat_activity \
        WHERE datname = current_database() AND wait_event_type = 'Lock'";

    /// Statements that make the database refuse, forever, every telemetry row matching
    /// `condition` (SQL on the row as `NEW`), with an error that says `poisoned reading`.
    pub fn refuse_readings_where(postgres: bool, condition: &str) -> Vec<String> {
        if postgres {
            vec![
                format!(
                    "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF {condition} THEN RAISE EXCEPTION 'poisoned reading'; END IF; RETURN NEW; END $$"
                ),
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION poison()"
                    .to_string(),
            ]
        } else {
            vec![format!(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN {condition} \
                 BEGIN SELECT RAISE(ABORT, 'poisoned reading'); END"
            )]
        }
    }
}
