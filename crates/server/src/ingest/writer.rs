//! The one writer of device messages: group commit, and a completion per message that fires
//! only once the message is durable (committed, or kept as a dead letter).
//!
//! Whoever acknowledges a device's message waits for that completion first (the embedded
//! broker's publish hook holds the device's PUBACK until then), so nothing acknowledged is
//! lost, whatever moment the process dies at.
//!
//! Errors are told apart by cause. When the database is unavailable (busy past the busy
//! timeout, locked, I/O error, disk full) nothing is acknowledged and the whole batch is tried
//! again after a pause; no message is dead-lettered for it. When the database refuses what a
//! message asks (a constraint, a trigger, a type), the batch is stored message by message, and
//! a message refused [`MAX_TRIES`] times on its own goes to the `dead_letters` table with the
//! reason while the messages after it are stored.
//!
//! The writer never awaits its consumers: what a commit changed leaves as [`IngestEvent`]s on
//! an unbounded channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use flotilla_proto::{DeviceId, Telemetry};

use super::{Item, decode_item};
use crate::metrics::IngestMetrics;
use flotilla_store::{DeviceUpdate, Finished, Store, StoreResult, WriteTx, now_ms};

/// Attempts for one message on its own before it is dead-lettered.
pub const MAX_TRIES: usize = 3;

/// Payload bytes waiting beyond which QoS 0 messages are dropped (at most once is what QoS 0
/// promises). QoS 1 messages are never dropped: each holds its device's next packet (rmqtt
/// handles a connection's packets in order), so those of live connections are bounded by the
/// connected fleet. Not bounded: a message whose hook gave up waiting (its device was
/// disconnected and resends it) stays queued, so a long database outage adds about one
/// message per device per hook timeout until the database returns.
const LOSSY_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// A message from a device, as the broker received it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// When this replica received it (ms): the order in which one device's messages change
    /// its state, whichever replica commits them first.
    pub received_at: i64,
}

impl Inbound {
    /// A message received now.
    pub fn new(topic: String, payload: Bytes) -> Inbound {
        Inbound {
            topic,
            payload,
            received_at: receive_stamp(),
        }
    }
}

/// The wall clock in ms, never below a stamp this process gave before: a clock stepped back
/// (an NTP correction) cannot make a later message look older than an earlier one.
fn receive_stamp() -> i64 {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = now_ms();
    LAST.fetch_max(now, Ordering::Relaxed).max(now)
}

/// What a committed message changed that others act on.
#[derive(Debug)]
pub enum IngestEvent {
    /// A message brought the device from offline to online.
    CameOnline(DeviceId),
    /// A report ended one of the device's updates.
    Finished(Finished),
}

/// The writer stopped (the server is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("ingest writer stopped")]
pub struct Stopped;

struct Job {
    msg: Inbound,
    done: Option<oneshot::Sender<()>>,
}

impl Job {
    fn weight(&self) -> usize {
        self.msg.payload.len() + self.msg.topic.len()
    }
}

/// Cheap handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Job>,
    queued_bytes: Arc<AtomicUsize>,
    metrics: IngestMetrics,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("queued_bytes", &self.queued_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Writer {
    /// Starts the writer task. `batch` bounds the messages per transaction; `metrics` counts
    /// what it does.
    pub fn spawn(
        store: Store,
        batch: usize,
        events: mpsc::UnboundedSender<IngestEvent>,
        metrics: IngestMetrics,
    ) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let task = Task {
            store,
            batch: batch.max(1),
            events,
            queued_bytes: queued_bytes.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(task.run(rx));
        Writer {
            tx,
            queued_bytes,
            metrics,
        }
    }

    /// Bytes of messages waiting for their commit.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Stores a message; returns once it is durable.
    pub async fn store(&self, msg: Inbound) -> Result<(), Stopped> {
        self.queue_durable(msg)?.await
    }

    /// Queues a message now, in call order, and returns what resolves once it is durable (so
    /// messages taken one after another are committed in that order, whoever awaits first).
    pub fn queue_durable(
        &self,
        msg: Inbound,
    ) -> Result<impl Future<Output = Result<(), Stopped>> + use<>, Stopped> {
        let (done, durable) = oneshot::channel();
        self.enqueue(msg, Some(done))?;
        Ok(async move { durable.await.map_err(|_| Stopped) })
    }

    /// Queues a message nobody waits for (a will). Never dropped.
    pub fn submit(&self, msg: Inbound) -> Result<(), Stopped> {
        self.enqueue(msg, None)
    }

    /// Queues a QoS 0 message unless the queue already holds [`LOSSY_QUEUE_BYTES`]; false if
    /// it was dropped.
    pub fn submit_lossy(&self, msg: Inbound) -> bool {
        let job = Job { msg, done: None };
        let weight = job.weight();
        // Reserve first, then check, so concurrent callers cannot all pass the check.
        let before = self.queued_bytes.fetch_add(weight, Ordering::Relaxed);
        if before >= LOSSY_QUEUE_BYTES {
            self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
            self.metrics.dropped.inc();
            return false;
        }
        self.send(job, weight).is_ok()
    }

    fn enqueue(&self, msg: Inbound, done: Option<oneshot::Sender<()>>) -> Result<(), Stopped> {
        let job = Job { msg, done };
        let weight = job.weight();
        self.queued_bytes.fetch_add(weight, Ordering::Relaxed);
        self.send(job, weight)
    }

    fn send(&self, job: Job, weight: usize) -> Result<(), Stopped> {
        self.tx.send(job).map_err(|_| {
            self.queued_bytes.fetch_sub(weight, Ordering::Relaxed);
            Stopped
        })?;
        self.metrics.received.inc();
        Ok(())
    }
}

/// The writer task's state.
struct Task {
    store: Store,
    batch: usize,
    events: mpsc::UnboundedSender<IngestEvent>,
    queued_bytes: Arc<AtomicUsize>,
    metrics: IngestMetrics,
}

impl Task {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut jobs = Vec::with_capacity(self.batch);
        while rx.recv_many(&mut jobs, self.batch).await > 0 {
            let items: Vec<(usize, Item)> = jobs
                .iter()
                .enumerate()
                .filter_map(|(k, job)| match decode_item(&job.msg.topic, &job.msg.payload) {
                    Ok(item) => Some((k, item)),
                    Err(why) => {
                        self.metrics.malformed.inc();
                        tracing::warn!(topic = %flotilla_proto::truncate_chars(&job.msg.topic, 120), bytes = job.msg.payload.len(), why, "dropped malformed device message");
                        None
                    }
                })
                .collect();
            let changes = self.store_all(&jobs, &items).await;
            self.queued_bytes
                .fetch_sub(jobs.iter().map(Job::weight).sum(), Ordering::Relaxed);
            for job in jobs.drain(..) {
                if let Some(done) = job.done {
                    let _ = done.send(());
                }
            }
            for event in changes {
                let _ = self.events.send(event);
            }
        }
    }

    /// Stores every item: one transaction for all, else one per item, dead-lettering the
    /// ones the database keeps refusing. Returns only when every item is durable.
    async fn store_all(&self, jobs: &[Job], items: &[(usize, Item)]) -> Vec<IngestEvent> {
        if items.is_empty() {
            return Vec::new();
        }
        match self
            .commit_when_available(
                items
                    .iter()
                    .map(|(k, item)| (jobs[*k].msg.received_at, item)),
            )
            .await
        {
            Ok(changes) => return changes,
            Err(e) if items.len() > 1 => {
                tracing::warn!(error = %e, messages = items.len(), "ingest batch refused; storing one by one")
            }
            Err(_) => {}
        }
        let mut changes = Vec::new();
        for (k, item) in items {
            changes.extend(self.store_one(&jobs[*k].msg, item).await);
        }
        changes
    }

    async fn store_one(&self, msg: &Inbound, item: &Item) -> Vec<IngestEvent> {
        let mut last_error = String::new();
        for _ in 0..MAX_TRIES {
            match self
                .commit_when_available(std::iter::once((msg.received_at, item)))
                .await
            {
                Ok(changes) => return changes,
                Err(e) => last_error = e.to_string(),
            }
        }
        let mut pause = Pause::default();
        loop {
            match self
                .store
                .dead_letter(&msg.topic, &msg.payload, &last_error)
                .await
            {
                Ok(()) => {
                    self.metrics.dead_lettered.inc();
                    tracing::error!(topic = %flotilla_proto::truncate_chars(&msg.topic, 120), reason = %last_error, "message dead-lettered");
                    return Vec::new();
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not keep the dead letter; ingest waits");
                    pause.wait().await;
                }
            }
        }
    }

    /// Commits, waiting out every error that says the database is unavailable; returns only
    /// the errors that say it refused the content.
    async fn commit_when_available<'a>(
        &self,
        items: impl Iterator<Item = (i64, &'a Item)> + Clone,
    ) -> StoreResult<Vec<IngestEvent>> {
        let mut pause = Pause::default();
        loop {
            let started = std::time::Instant::now();
            match commit(&self.store, items.clone()).await {
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(error = %e, "ingest waits");
                    pause.wait().await;
                }
                Ok(changes) => {
                    self.metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics.stored.inc_by(items.count() as u64);
                    return Ok(changes);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Capped exponential pause between tries against an unavailable database.
struct Pause(Duration);

impl Default for Pause {
    fn default() -> Self {
        Pause(Duration::from_millis(50))
    }
}

impl Pause {
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}

/// One transaction over `items`. Consecutive telemetry readings, the bulk of what devices
/// send, are stored together in a few statements (`WriteTx::apply_readings`); the
/// order of everything else is kept.
async fn commit<'a>(
    store: &Store,
    items: impl Iterator<Item = (i64, &'a Item)>,
) -> StoreResult<Vec<IngestEvent>> {
    let now = now_ms();
    let mut tx = store.begin_write().await?;
    let mut changes = Vec::new();
    let mut readings: Vec<(&DeviceId, &Telemetry, i64)> = Vec::new();
    for (received, item) in items {
        if let Item::Update(device, DeviceUpdate::Telemetry(t)) = item {
            readings.push((device, t, received));
            continue;
        }
        store_readings(&mut tx, &mut readings, &mut changes).await?;
        match item {
            Item::Update(device, update) => {
                if tx.apply_update(device, update, received).await? {
                    changes.push(IngestEvent::CameOnline(device.clone()));
                }
            }
            Item::Reply(device, reply) => {
                tx.apply_reply(device, reply, now).await?;
            }
            Item::Ota(device, status) => {
                tracing::info!(device = %device, status = ?status.status, id = ?status.id, "OTA status");
                if let Some(f) = tx.apply_ota_status(device, status, now).await? {
                    changes.push(IngestEvent::Finished(f));
                }
            }
        }
    }
    store_readings(&mut tx, &mut readings, &mut changes).await?;
    tx.commit().await?;
    Ok(changes)
}

/// Stores and empties the run of readings gathered so far.
async fn store_readings(
    tx: &mut WriteTx,
    readings: &mut Vec<(&DeviceId, &Telemetry, i64)>,
    changes: &mut Vec<IngestEvent>,
) -> StoreResult<()> {
    if readings.is_empty() {
        return Ok(());
    }
    let came_online = tx.apply_readings(readings).await?;
    changes.extend(came_online.into_iter().map(IngestEvent::CameOnline));
    readings.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::Backend;
    use flotilla_store::testdb::{TestDb, dev};
    use sqlx::Connection;

    /// A database with devices d1-d3, opened with a 100 ms busy (lock) timeout.
    async fn db_with_devices(backend: Backend) -> TestDb {
        let mut db = TestDb::new(backend).await;
        db.reopen_with_busy_timeout(Duration::from_millis(100))
            .await;
        db.with_devices(&["d1", "d2", "d3"]).await;
        db
    }

    /// A SQLite file in `dir` with devices d1-d3 (tests that read the file directly).
    async fn store_with_device(dir: &std::path::Path) -> Store {
        let store = Store::open_file(&dir.join("db")).await.unwrap();
        let owner = store
            .create_user("o", "o@x", "hash", flotilla_store::Role::Operator)
            .await
            .unwrap();
        for d in ["d1", "d2", "d3"] {
            assert!(store.register_device(&dev(d), d, owner).await.unwrap());
        }
        store
    }

    fn reading(seq: u64) -> Inbound {
        Inbound::new(
            "devices/d1/telemetry".into(),
            Bytes::from(format!(r#"{{"seq":{seq}}}"#)),
        )
    }

    async fn seqs(store: &Store) -> Vec<i64> {
        store
            .telemetry(&dev("d1"), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.seq)
            .rev()
            .collect()
    }

    #[tokio::test]
    async fn a_database_locked_past_the_busy_timeout_delays_messages_and_dead_letters_none() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let db = db_with_devices(backend).await;
            let store = db.store();
            let (events, _rx) = mpsc::unbounded_channel();
            let writer = Writer::spawn(store.clone(), 64, events, IngestMetrics::default());
            let mut locker = db.lock_writes().await;
            let pending: Vec<_> = (0..5)
                .map(|seq| {
                    let w = writer.clone();
                    tokio::spawn(async move { w.store(reading(seq)).await })
                })
                .collect();
            // Held for 15 busy timeouts: every commit in that time fails (SQLITE_BUSY;
            // PostgreSQL's lock_timeout, 55P03).
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(
                pending.iter().all(|p| !p.is_finished()),
                "{backend:?}: acknowledged while locked"
            );
            sqlx::raw_sql("COMMIT").execute(&mut *locker).await.unwrap();
            for p in pending {
                p.await.unwrap().unwrap();
            }
            assert_eq!(seqs(store).await, vec![0, 1, 2, 3, 4], "{backend:?}");
            assert!(
                store.dead_letters(10).await.unwrap().is_empty(),
                "{backend:?}"
            );
        }
    }

    /// Two replicas' writers on one database: the will one of them received last, committed
    /// first, is not undone by a heartbeat the other received before it and commits after.
    #[tokio::test]
    async fn a_message_is_ordered_by_when_it_was_received_not_when_it_was_committed() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let db = db_with_devices(backend).await;
            let store = db.store();
            let spawn = || {
                let (events, _rx) = mpsc::unbounded_channel();
                Writer::spawn(store.clone(), 64, events, IngestMetrics::default())
            };
            let (a, b) = (spawn(), spawn());
            let heartbeat = Inbound::new(
                "devices/d1/health".into(),
                Bytes::from_static(br#"{"heap":1,"fw":"1.0.0"}"#),
            );
            let mut will = Inbound::new(
                "devices/d1/status".into(),
                Bytes::from_static(br#"{"online":false,"reason":"connection lost"}"#),
            );
            will.received_at = heartbeat.received_at + 1;
            b.store(will).await.unwrap();
            a.store(heartbeat).await.unwrap();
            let d = store.device(&dev("d1")).await.unwrap().unwrap();
            assert_eq!(
                (d.online, d.disconnect_reason.as_deref(), d.heap),
                (false, Some("connection lost"), Some(1)),
                "{backend:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_message_the_database_refuses_is_dead_lettered_and_its_batch_is_stored() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let db = db_with_devices(backend).await;
            let store = db.store();
            db.refuse_readings_where("NEW.seq = 3").await;
            let (events, _rx) = mpsc::unbounded_channel();
            let metrics = IngestMetrics::default();
            let writer = Writer::spawn(store.clone(), 64, events, metrics.clone());
            let all: Vec<_> = (0..6)
                .map(|seq| {
                    let w = writer.clone();
                    tokio::spawn(async move { w.store(reading(seq)).await })
                })
                .collect();
            for p in all {
                p.await.unwrap().unwrap();
            }
            assert_eq!(seqs(store).await, vec![0, 1, 2, 4, 5], "{backend:?}");
            let dead = store.dead_letters(10).await.unwrap();
            assert_eq!(dead.len(), 1, "{backend:?}");
            assert!(dead[0].1.contains("poisoned"), "{dead:?}");
            assert_eq!(writer.queued_bytes.load(Ordering::Relaxed), 0);
            assert_eq!(
                (
                    metrics.stored.get(),
                    metrics.dead_lettered.get(),
                    metrics.received.get()
                ),
                (5, 1, 6),
                "{backend:?}"
            );
        }
    }

    /// What a store holds that ingest writes (receive times included: the tests give them).
    async fn ingest_state(
        dir: &std::path::Path,
    ) -> (
        Vec<(
            String,
            i64,
            Option<i64>,
            Option<i64>,
            Option<bool>,
            Option<f64>,
            i64,
        )>,
        Vec<(
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        )>,
    ) {
        let mut db =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", dir.join("db").display()))
                .await
                .unwrap();
        let telemetry = sqlx::query_as(
            "SELECT device_id, seq, device_ts, pot, switch, temp, received_at FROM telemetry ORDER BY device_id, seq",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        let devices = sqlx::query_as(
            "SELECT device_id, online, disconnect_reason, last_seen, presence_at, heap FROM devices ORDER BY device_id",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        (telemetry, devices)
    }

    #[tokio::test]
    async fn a_batch_of_mixed_messages_stores_what_one_message_at_a_time_stores() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // d4 is blocked: like the unknown ghost, nothing it sends changes anything.
        let devices = ["d1", "d2", "d3", "d4", "ghost"];
        // More readings in one run than one multi-row statement takes.
        let items: Vec<Item> = (0..3500)
            .map(|k| {
                let device = devices[rng.random_range(0..devices.len())];
                // The first 2,200 are one run of readings (about 1,300 for known devices): more
                // than one statement takes.
                let kind = if k < 2200 { 2 } else { rng.random_range(0..20) };
                let (topic, payload) = match kind {
                    0 => (
                        "status",
                        format!(r#"{{"online":{},"reason":"r"}}"#, rng.random_bool(0.5)),
                    ),
                    1 => ("health", r#"{"heap":1000,"fw":"1.0.0"}"#.to_string()),
                    // Repeated sequence numbers: a redelivery must not make a second row.
                    _ => (
                        "telemetry",
                        format!(
                            r#"{{"seq":{},"ts":{},"pot":{},"switch":{},"temp":{}}}"#,
                            rng.random_range(0..1500),
                            rng.random_range(0..1_000_000_000_u64),
                            rng.random_range(0..4096),
                            rng.random_bool(0.5),
                            f64::from(rng.random_range(-400..1250)) / 10.0
                        ),
                    ),
                };
                decode_item(&format!("devices/{device}/{topic}"), payload.as_bytes()).unwrap()
            })
            .collect();
        // Received out of order and some at one instant, as from two replicas: many messages
        // are older than what their device's state holds already.
        let received: Vec<i64> = (0..items.len())
            .map(|_| rng.random_range(1_000..1_400))
            .collect();
        let (batched_dir, single_dir) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut events = Vec::new();
        for dir in [batched_dir.path(), single_dir.path()] {
            let store = store_with_device(dir).await;
            let owner = store.user_by_email("o@x").await.unwrap().unwrap().id;
            assert!(
                store
                    .register_device(&dev("d4"), "d4", owner)
                    .await
                    .unwrap()
            );
            assert!(store.toggle_device_block(&dev("d4")).await.unwrap());
            let mut came_online: Vec<String> = if dir == batched_dir.path() {
                commit(&store, received.iter().copied().zip(&items))
                    .await
                    .unwrap()
            } else {
                // The reference: every message through the one-message path, one transaction.
                let mut tx = store.begin_write().await.unwrap();
                let mut changes = Vec::new();
                for (at, item) in received.iter().copied().zip(&items) {
                    if let Item::Update(device, update) = item
                        && tx.apply_update(device, update, at).await.unwrap()
                    {
                        changes.push(IngestEvent::CameOnline(device.clone()));
                    }
                }
                tx.commit().await.unwrap();
                changes
            }
            .into_iter()
            .map(|e| match e {
                IngestEvent::CameOnline(d) => d.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
            came_online.sort();
            events.push(came_online);
        }
        let batched = ingest_state(batched_dir.path()).await;
        assert!(batched.0.len() > 1500, "{}", batched.0.len());
        assert!(
            batched
                .0
                .iter()
                .all(|row| row.0 != "d4" && row.0 != "ghost")
        );
        assert_eq!(batched, ingest_state(single_dir.path()).await);
        assert_eq!(events[0], events[1]);
    }

    #[test]
    fn qos0_messages_past_the_byte_cap_are_dropped_and_others_are_not() {
        // A writer with no task: nothing drains the queue.
        let (tx, _rx) = mpsc::unbounded_channel();
        let writer = Writer {
            tx,
            queued_bytes: Arc::new(AtomicUsize::new(LOSSY_QUEUE_BYTES - 10)),
            metrics: IngestMetrics::default(),
        };
        assert!(writer.submit_lossy(reading(1)));
        assert!(!writer.submit_lossy(reading(2)));
        assert!(writer.submit(reading(3)).is_ok(), "a will is never dropped");
    }
}
