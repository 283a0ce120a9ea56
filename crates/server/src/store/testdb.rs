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
    pub store: Store,
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<String>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = DatabaseUrl::Sqlite(dir.path().join("flotilla.db"));
        TestDb {
            store: Store::open(&url).await.expect("opening SQLite"),
            url,
            _dir: Some(dir),
            postgres: None,
        }
    }

    pub async fn postgres() -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flotilla_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} (set FLOTILLA_TEST_POSTGRES): {e}"));
        // Two statements: one simple query holding both would run in a transaction, where
        // neither may run.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::raw_sql(&sql)
                .execute(&mut conn)
                .await
                .expect("creating a test database");
        }
        let (base, _) = admin.rsplit_once('/').expect("a database in the URL");
        let url = DatabaseUrl::Postgres(format!("{base}/{name}"));
        TestDb {
            store: Store::open(&url).await.expect("opening PostgreSQL"),
            url,
            _dir: None,
            postgres: Some(name),
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
