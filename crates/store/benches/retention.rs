//! Retention under load: how fast the telemetry age sweep deletes (rows/s) while ingest
//! writes, and what ingest manages meanwhile against ingest alone, in the same run, on SQLite
//! and PostgreSQL. Ingest is the store half of the server's writer: transactions of 200
//! readings from 1,000 devices through `WriteTx::apply_readings`. Retention is the server's
//! loop (crates/server/src/retention.rs): `delete_expired` batches of 2,000 rows with a
//! 10 ms pause between them. The broker and MQTT are not in this measure (fleet-bench has them).
//!
//! Run: `cargo bench -p flotilla-store --bench retention` (figures in docs/benchmarks.md;
//! needs the local PostgreSQL service, else only SQLite runs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_proto::{DeviceId, Telemetry};
use flotilla_store::{DatabaseUrl, RetentionKind, Store};

const DEVICES: usize = 1_000;
const OLD_ROWS: i64 = 500_000;
const INGEST_BATCH: usize = 200;
const RETENTION_BATCH: i64 = 2_000;
const PAUSE: Duration = Duration::from_millis(10);
const BASELINE: Duration = Duration::from_secs(6);
/// Old rows are received at 1,000 ms after the epoch; fresh ones now.
const CUTOFF: i64 = 10_000;

async fn prefill(store: &Store, url: &DatabaseUrl) -> anyhow::Result<()> {
    use sqlx::Connection;
    let owner = store
        .create_user("bench", "bench@x", "h", flotilla_store::Role::Operator)
        .await?;
    for d in 0..DEVICES {
        let id = DeviceId::parse(&format!("dev-{d}")).map_err(anyhow::Error::msg)?;
        store.register_device(&id, "bench", owner).await?;
    }
    sqlx::any::install_default_drivers();
    let url = match url {
        DatabaseUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
        DatabaseUrl::Postgres(u) => u.clone(),
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await?;
    // Old readings seq 1..=500 of each device, one statement.
    sqlx::query(
        "WITH RECURSIVE n(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM n WHERE k + 1 < $1) \
         INSERT INTO telemetry (device_id, seq, received_at, pot) \
         SELECT 'dev-' || CAST(k % 1000 AS TEXT), k / 1000 + 1, 1000, 1 FROM n",
    )
    .bind(OLD_ROWS)
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Writes readings until `stop`; counts them in `stored`.
async fn ingest(store: Store, stop: Arc<AtomicBool>, stored: Arc<AtomicU64>, first_seq: u64) {
    let ids: Vec<DeviceId> = (0..DEVICES)
        .map(|d| DeviceId::parse(&format!("dev-{d}")).expect("a valid id"))
        .collect();
    let mut seq = first_seq;
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<(DeviceId, Telemetry)> = (0..INGEST_BATCH)
            .map(|_| {
                let d = ids[next % DEVICES].clone();
                next += 1;
                if next.is_multiple_of(DEVICES) {
                    seq += 1;
                }
                let t = Telemetry {
                    seq,
                    ts: None,
                    pot: Some(7),
                    switch: None,
                    temp: None,
                    ord: None,
                };
                (d, t)
            })
            .collect();
        let now = flotilla_store::now_ms();
        let refs: Vec<(&DeviceId, &Telemetry, i64)> =
            batch.iter().map(|(d, t)| (d, t, now)).collect();
        let mut tx = store.begin_write().await.expect("begin");
        tx.apply_readings(&refs).await.expect("store");
        tx.commit().await.expect("commit");
        stored.fetch_add(INGEST_BATCH as u64, Ordering::Relaxed);
    }
}

struct Figures {
    ingest_alone: f64,
    ingest_during: f64,
    deleted_per_s: f64,
    retention_secs: f64,
}

async fn measure(store: &Store) -> anyhow::Result<Figures> {
    // Ingest alone.
    let (stop, stored) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = tokio::spawn(ingest(store.clone(), stop.clone(), stored.clone(), 1_000));
    tokio::time::sleep(BASELINE).await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let ingest_alone = stored.load(Ordering::Relaxed) as f64 / BASELINE.as_secs_f64();

    // Ingest while retention deletes every old row.
    let (stop, stored) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = tokio::spawn(ingest(store.clone(), stop.clone(), stored.clone(), 100_000));
    let t = Instant::now();
    let mut deleted = 0u64;
    loop {
        let n = store
            .delete_expired(RetentionKind::Telemetry, CUTOFF, RETENTION_BATCH)
            .await?;
        deleted += n;
        if n < RETENTION_BATCH as u64 {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let during = stored.load(Ordering::Relaxed) as f64 / secs;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    anyhow::ensure!(
        deleted == OLD_ROWS as u64,
        "deleted {deleted} of {OLD_ROWS}"
    );
    Ok(Figures {
        ingest_alone,
        ingest_during: during,
        deleted_per_s: deleted as f64 / secs,
        retention_secs: secs,
    })
}

fn report(engine: &str, f: &Figures) {
    println!(
        "{engine}: retention deleted {OLD_ROWS} rows in {:.1} s ({:.0} rows/s) while ingest stored \
         {:.0} readings/s; ingest alone {:.0} readings/s ({:+.0}%)",
        f.retention_secs,
        f.deleted_per_s,
        f.ingest_during,
        f.ingest_alone,
        (f.ingest_during / f.ingest_alone - 1.0) * 100.0
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = DatabaseUrl::Sqlite(dir.path().join("bench.db"));
    let sqlite = Store::open(&url).await?;
    prefill(&sqlite, &url).await?;
    report("sqlite", &measure(&sqlite).await?);
    match flotilla_pgtest::TempDatabase::create("flotilla_bench_").await {
        Ok(db) => {
            let url = DatabaseUrl::Postgres(db.url().to_string());
            let pg = Store::open(&url).await?;
            prefill(&pg, &url).await?;
            report("postgres", &measure(&pg).await?);
        }
        Err(e) => println!("postgres: not run ({e})"),
    }
    Ok(())
}
