//! The one writer of device messages: group commit, and a completion per message that fires
//! only once the message is durable (committed, or kept as a dead letter).
//!
//! Whoever acknowledges a device's message waits for that completion first: the embedded
//! broker's publish hook (which holds the device's PUBACK until then) and the MQTT link to an
//! external broker (which sends its manual ack then). So nothing acknowledged is lost, whatever
//! moment the process dies at.
//!
//! A batch that fails to commit is retried message by message; a message that fails
//! [`MAX_TRIES`] times on its own goes to the `dead_letters` table with the reason, and the
//! messages after it are stored. When even the dead letter cannot be written the database is
//! unavailable: nothing is acknowledged and the writer waits and tries again.
//!
//! The writer never awaits its consumers: what a commit changed leaves as [`IngestEvent`]s on
//! an unbounded channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Item, decode_item};
use crate::store::{Finished, Store, now_ms};

/// Attempts for one message on its own before it is dead-lettered.
pub const MAX_TRIES: usize = 3;

/// QoS 0 messages waiting beyond this are dropped (at most once is what QoS 0 promises);
/// acknowledged messages are never dropped.
const LOSSY_QUEUE_CAP: usize = 100_000;

/// A message from a device, as the broker received it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
}

/// What a committed message changed that others act on.
#[derive(Debug)]
pub enum IngestEvent {
    /// A message brought the device from offline to online.
    CameOnline(String),
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

/// Cheap handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Job>,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish()
    }
}

impl Writer {
    /// Starts the writer task. `batch` bounds the messages per transaction.
    pub fn spawn(store: Store, batch: usize, events: mpsc::UnboundedSender<IngestEvent>) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(store, rx, batch.max(1), events, queued.clone()));
        Writer { tx, queued }
    }

    /// Stores a message; returns once it is durable.
    pub async fn store(&self, msg: Inbound) -> Result<(), Stopped> {
        let (done, durable) = oneshot::channel();
        self.enqueue(msg, Some(done))?;
        durable.await.map_err(|_| Stopped)
    }

    /// Queues a message nobody waits for (a will). Never dropped.
    pub fn submit(&self, msg: Inbound) -> Result<(), Stopped> {
        self.enqueue(msg, None)
    }

    /// Queues a QoS 0 message unless the queue is already deep; false if it was dropped.
    pub fn submit_lossy(&self, msg: Inbound) -> bool {
        self.queued.load(Ordering::Relaxed) < LOSSY_QUEUE_CAP && self.enqueue(msg, None).is_ok()
    }

    fn enqueue(&self, msg: Inbound, done: Option<oneshot::Sender<()>>) -> Result<(), Stopped> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Job { msg, done }).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            Stopped
        })
    }
}

async fn run(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Job>,
    batch: usize,
    events: mpsc::UnboundedSender<IngestEvent>,
    queued: Arc<AtomicUsize>,
) {
    let mut jobs = Vec::with_capacity(batch);
    while rx.recv_many(&mut jobs, batch).await > 0 {
        let items: Vec<(usize, Item)> = jobs
            .iter()
            .enumerate()
            .filter_map(|(k, job)| match decode_item(&job.msg.topic, &job.msg.payload) {
                Ok(item) => Some((k, item)),
                Err(why) => {
                    tracing::warn!(topic = %flotilla_proto::truncate_chars(&job.msg.topic, 120), bytes = job.msg.payload.len(), why, "dropped malformed device message");
                    None
                }
            })
            .collect();
        let changes = store_all(&store, &jobs, &items).await;
        queued.fetch_sub(jobs.len(), Ordering::Relaxed);
        for job in jobs.drain(..) {
            if let Some(done) = job.done {
                let _ = done.send(());
            }
        }
        for event in changes {
            let _ = events.send(event);
        }
    }
}

/// Stores every item: one transaction for all, else one per item, dead-lettering the ones
/// that keep failing. Returns only when every item is durable.
async fn store_all(store: &Store, jobs: &[Job], items: &[(usize, Item)]) -> Vec<IngestEvent> {
    if items.is_empty() {
        return Vec::new();
    }
    match commit(store, items.iter().map(|(_, item)| item)).await {
        Ok(changes) => return changes,
        Err(e) if items.len() > 1 => {
            tracing::warn!(error = %e, messages = items.len(), "ingest batch failed; storing one by one")
        }
        Err(_) => {}
    }
    let mut changes = Vec::new();
    for (k, item) in items {
        changes.extend(store_one(store, &jobs[*k].msg, item).await);
    }
    changes
}

async fn store_one(store: &Store, msg: &Inbound, item: &Item) -> Vec<IngestEvent> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut last_error = String::new();
        for _ in 0..MAX_TRIES {
            match commit(store, std::iter::once(item)).await {
                Ok(changes) => return changes,
                Err(e) => last_error = e.to_string(),
            }
        }
        match store
            .dead_letter(&msg.topic, &msg.payload, &last_error)
            .await
        {
            Ok(()) => {
                tracing::error!(topic = %flotilla_proto::truncate_chars(&msg.topic, 120), reason = %last_error, "message dead-lettered");
                return Vec::new();
            }
            Err(e) => {
                // Not even the dead letter could be written: the database is unavailable.
                // Nothing here is acknowledged yet, so waiting loses nothing.
                tracing::error!(error = %e, "database unavailable; ingest waits");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One transaction over `items`.
async fn commit<'a>(
    store: &Store,
    items: impl Iterator<Item = &'a Item>,
) -> sqlx::Result<Vec<IngestEvent>> {
    let now = now_ms();
    let mut tx = store.begin_write().await?;
    let mut changes = Vec::new();
    for item in items {
        match item {
            Item::Update(device, update) => {
                if crate::store::apply_update(&mut tx, device.as_str(), update, now).await? {
                    changes.push(IngestEvent::CameOnline(device.as_str().to_string()));
                }
            }
            Item::Reply(device, reply) => {
                Store::apply_reply(&mut tx, device.as_str(), reply, now).await?;
            }
            Item::Ota(device, status) => {
                tracing::info!(device = %device, status = ?status.status, id = ?status.id, "OTA status");
                if let Some(f) =
                    crate::store::apply_ota_status(&mut tx, device.as_str(), status, now).await?
                {
                    changes.push(IngestEvent::Finished(f));
                }
            }
        }
    }
    tx.commit().await?;
    Ok(changes)
}
