//! Fresh databases for tests: a SQLite file in a temporary directory, or a PostgreSQL database
//! the test creates on the local server and drops when done.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

use super::{DatabaseUrl, Store};

/// The PostgreSQL server tests create their databases on (`FLOTILLA_TEST_POSTGRES` to
/// override); its user needs CREATEDB.
pub fn admin_url() -> String {
    std::env::var("FLOTILLA_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A store on a database of its own; the database goes away with it.
pub struct TestDb {
    store: Option<Store>,
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<String>,
}

impl TestDb {
    pub async fn new(backend: super::Backend) -> TestDb {
        match backend {
            super::Backend::Sqlite => TestDb::sqlite().await,
            super::Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// The same database opened again with another busy (lock) timeout.
    pub async fn reopen_with_busy_timeout(&mut self, busy: std::time::Duration) {
        self.store = Some(
            Store::open_with_busy_timeout(&self.url, busy)
                .await
                .expect("reopening"),
        );
    }

    /// Holds the write lock ingest's commits need until the connection commits or drops:
    /// SQLite's `BEGIN IMMEDIATE`; on PostgreSQL, locks that block writes to the tables
    /// ingest writes.
    pub async fn lock_writes(&self) -> sqlx::pool::PoolConnection<sqlx::Any> {
        let mut conn = self.store().pool.acquire().await.expect("connection");
        let statements: &[&str] = match self.store().backend {
            super::Backend::Sqlite => &["BEGIN IMMEDIATE"],
            super::Backend::Postgres => {
                &["BEGIN", "LOCK TABLE telemetry, devices IN EXCLUSIVE MODE"]
            }
        };
        for sql in statements {
            sqlx::raw_sql(sql)
                .execute(&mut *conn)
                .await
                .expect("locking");
        }
        conn
    }

    /// Makes the database refuse, forever, every telemetry row matching `condition` (SQL on
    /// the row as `NEW`).
    pub async fn refuse_readings_where(&self, condition: &str) {
        let pool = &self.store().pool;
        let statements = match self.store().backend {
            super::Backend::Sqlite => vec![format!(
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN {condition} \
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )],
            super::Backend::Postgres => vec![
                format!(
                    "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF {condition} THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$"
                ),
                "CREATE TRIGGER poison BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION poison()"
                    .to_string(),
            ],
        };
        for sql in statements {
            sqlx::raw_sql(&sql).execute(pool).await.expect("trigger");
        }
    }

    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = DatabaseUrl::Sqlite(dir.path().join("flotilla.db"));
        TestDb {
            store: Some(Store::open(&url).await.expect("opening SQLite")),
            url,
            _dir: Some(dir),
            postgres: None,
        }
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("opened")
    }

    /// A fresh PostgreSQL database, not opened (nor migrated) yet.
    pub async fn postgres_empty() -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flotilla_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin_url();
        let shown = super::redact(&admin, &admin);
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {shown} (set FLOTILLA_TEST_POSTGRES): {}",
                    super::redact(&e.to_string(), &admin)
                )
            });
        drop_abandoned(&mut conn, "flotilla_test_").await;
        // One statement each (neither may run in a transaction). An ICU collation that does
        // not sort bytewise, so a listing that relies on the database's default order fails.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!(
                "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            ),
        ] {
            sqlx::raw_sql(&sql)
                .execute(&mut conn)
                .await
                .expect("creating a test database");
        }
        let (base, _) = admin.rsplit_once('/').expect("a database in the URL");
        let url = DatabaseUrl::Postgres(format!("{base}/{name}"));
        // Made before the store opens, so the database is dropped even if opening fails.
        TestDb {
            store: None,
            url,
            _dir: None,
            postgres: Some(name),
        }
    }

    pub async fn postgres() -> TestDb {
        let mut db = TestDb::postgres_empty().await;
        db.store = Some(Store::open(&db.url).await.expect("opening PostgreSQL"));
        db
    }
}

/// Drops databases with `prefix` left by test processes that no longer run (killed before
/// their own drop), named `<prefix><pid>_<n>`.
pub async fn drop_abandoned(conn: &mut sqlx::PgConnection, prefix: &str) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(prefix)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name[prefix.len()..]
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

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.postgres.take() else {
            return;
        };
        // Drop runs outside any runtime's reach: a thread of its own does the async work.
        let admin = admin_url();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
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
