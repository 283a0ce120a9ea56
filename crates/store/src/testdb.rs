//! Fresh databases for tests: a SQLite file in a temporary directory, or a PostgreSQL database
//! the test creates on the local server and drops when done.

use super::{DatabaseUrl, Store};

/// A device id for a test (panics on an invalid one).
pub fn dev(id: impl AsRef<str>) -> flotilla_proto::DeviceId {
    flotilla_proto::DeviceId::parse(id.as_ref()).expect("a valid device id")
}

/// A store on a database of its own; the database goes away with it.
pub struct TestDb {
    store: Option<Store>,
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    /// After `store`, so the pool closes before the database is dropped.
    _postgres: Option<flotilla_pgtest::TempDatabase>,
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

    /// Holds the write lock ingest's commits need until the connection commits or drops
    /// (`flotilla_pgtest::faults::lock_writes`).
    pub async fn lock_writes(&self) -> sqlx::pool::PoolConnection<sqlx::Any> {
        let mut conn = self.store().pool.acquire().await.expect("connection");
        for sql in flotilla_pgtest::faults::lock_writes(self.is_postgres()) {
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
        for sql in flotilla_pgtest::faults::refuse_readings_where(self.is_postgres(), condition) {
            sqlx::raw_sql(&sql)
                .execute(&self.store().pool)
                .await
                .expect("trigger");
        }
    }

    fn is_postgres(&self) -> bool {
        self.store().backend == super::Backend::Postgres
    }

    /// Creates user `o` (an operator) and registers `devices` to it; returns the user's id.
    pub async fn with_devices(&self, devices: &[&str]) -> i64 {
        let store = self.store();
        let owner = store
            .create_user("o", "o@x", "hash", super::Role::Operator)
            .await
            .expect("owner");
        for d in devices {
            assert!(
                store
                    .register_device(&dev(d), d, owner)
                    .await
                    .expect("device")
            );
        }
        owner
    }

    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = DatabaseUrl::Sqlite(dir.path().join("flotilla.db"));
        TestDb {
            store: Some(Store::open(&url).await.expect("opening SQLite")),
            url,
            _dir: Some(dir),
            _postgres: None,
        }
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("opened")
    }

    /// A fresh PostgreSQL database, not opened (nor migrated) yet.
    pub async fn postgres_empty() -> TestDb {
        let database = flotilla_pgtest::TempDatabase::create("flotilla_test_")
            .await
            .unwrap_or_else(|e| panic!("{}", super::redact(&e, &flotilla_pgtest::admin_url())));
        TestDb {
            store: None,
            url: DatabaseUrl::Postgres(database.url().to_string()),
            _dir: None,
            _postgres: Some(database),
        }
    }

    pub async fn postgres() -> TestDb {
        let mut db = TestDb::postgres_empty().await;
        db.store = Some(Store::open(&db.url).await.expect("opening PostgreSQL"));
        db
    }
}

/// Returns once a session on `store`'s PostgreSQL database waits for a lock (panics after 10 s).
pub async fn wait_until_a_query_waits_for_a_lock(store: &Store) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(flotilla_pgtest::faults::QUERIES_WAITING_FOR_A_LOCK)
            .fetch_one(&store.pool)
            .await
            .expect("pg_stat_activity");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no query waited for a lock within 10 s");
}
