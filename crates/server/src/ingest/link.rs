//! The ingest link: the server's MQTT client that takes device messages from a broker that is
//! not the embedded one, and acknowledges each only once the writer says it is durable.
//!
//! What makes it lossless:
//! - a persistent session (clean start off, a session expiry), so what the broker has not had
//!   acknowledged survives a reconnect of this client and is delivered again;
//! - acks are manual and sent only after the commit;
//! - an ack belongs to the connection its message came on. A message's commit can end after
//!   its connection dropped; its ack is then dropped, never sent on the next connection (where
//!   the packet id may name another message), and the broker's redelivery of the same message
//!   is stored again, which the store makes idempotent (telemetry is keyed on `(device, seq)`).
//!
//! Handle/runner split: one task owns the event loop and never awaits the writer; each
//! message's wait for its commit runs on a task of its own. The broker's in-flight window
//! (the Receive Maximum this client sends) bounds how many messages wait at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::sync::watch;

use super::writer::{Inbound, Writer};

/// Messages the broker may have in flight to this client; each holds a task until committed.
pub const RECEIVE_MAXIMUM: u16 = 1024;

/// How long the broker keeps this client's session (and what is queued for it) while it is
/// away: an hour covers a restart or an upgrade of the server.
pub const SESSION_EXPIRY_SECS: u32 = 3600;

/// What the link did, for tests and metrics.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Sessions started (CONNACKs).
    pub sessions: AtomicU64,
    /// CONNACKs that resumed a session the broker kept.
    pub resumed: AtomicU64,
    /// Messages taken from the broker (redeliveries included).
    pub received: AtomicU64,
    /// Acks sent after a commit.
    pub acked: AtomicU64,
    /// Acks dropped because their connection had closed before the commit ended.
    pub stale_acks: AtomicU64,
}

/// Handle to a running link.
#[derive(Debug, Clone)]
pub struct IngestLink {
    pub stats: Arc<LinkStats>,
    connected: watch::Receiver<bool>,
}

impl IngestLink {
    /// Connects with `options` (a persistent session with manual acks is set here), subscribes
    /// to `filters` at QoS 1 at every session start, and starts the runner.
    pub fn start(mut options: MqttOptions, filters: Vec<String>, writer: Writer) -> IngestLink {
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_manual_acks(true)
            .set_receive_maximum(Some(RECEIVE_MAXIMUM));
        // Room for an ack of every message in flight and the subscription: try_ack never
        // finds the queue full.
        let (client, eventloop) = AsyncClient::new(options, usize::from(RECEIVE_MAXIMUM) * 2);
        let stats = Arc::new(LinkStats::default());
        let (connected_tx, connected) = watch::channel(false);
        let runner = Runner {
            acker: Acker {
                client: client.clone(),
                stats: stats.clone(),
                connection: Arc::new(Mutex::new(0)),
            },
            client,
            filters,
            writer,
            stats: stats.clone(),
            connected: connected_tx,
        };
        tokio::spawn(runner.run(eventloop));
        IngestLink { stats, connected }
    }

    /// Waits until the link holds a session with its subscription sent.
    pub async fn connected(&mut self) {
        let _ = self.connected.wait_for(|up| *up).await;
    }
}

struct Runner {
    client: AsyncClient,
    filters: Vec<String>,
    writer: Writer,
    stats: Arc<LinkStats>,
    acker: Acker,
    connected: watch::Sender<bool>,
}

impl Runner {
    async fn run(self, mut eventloop: EventLoop) {
        let mut current = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                    if ack.session_present {
                        self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    // Sent at every session start: a broker that lost the session lost the
                    // subscription with it.
                    let filters = self
                        .filters
                        .iter()
                        .map(|f| Filter::new(f, QoS::AtLeastOnce));
                    if let Err(e) = self.client.try_subscribe_many(filters) {
                        tracing::error!(error = %e, "ingest link could not subscribe");
                    }
                    let _ = self.connected.send(true);
                    tracing::info!(resumed = ack.session_present, "ingest link connected");
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.take(current, publish),
                Ok(_) => {}
                Err(e) => {
                    let _ = self.connected.send(false);
                    {
                        let mut connection = self.acker.lock();
                        *connection += 1;
                        current = *connection;
                        // The event loop dropped the acks queued so far when the connection
                        // failed; acks queued since (commits that ended in between) are
                        // dropped now, before the next connection exists.
                        eventloop.clean();
                    }
                    tracing::warn!(error = %e, "ingest link lost its connection; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Hands a message to the writer; its ack follows the commit.
    fn take(&self, connection: u64, publish: Publish) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let Ok(topic) = std::str::from_utf8(&publish.topic).map(str::to_string) else {
            // Not a topic any device may use; nothing to store, and redelivery would not help.
            tracing::warn!("ingest link got a non-UTF-8 topic; acknowledged and dropped");
            self.acker.ack(connection, &publish);
            return;
        };
        let msg = Inbound {
            topic,
            payload: Bytes::clone(&publish.payload),
        };
        if publish.qos == QoS::AtMostOnce {
            self.writer.submit_lossy(msg);
            return;
        }
        let (writer, acker) = (self.writer.clone(), self.acker.clone());
        tokio::spawn(async move {
            if writer.store(msg).await.is_ok() {
                acker.ack(connection, &publish);
            }
        });
    }
}

/// Sends the acks of committed messages, each on its own connection only.
#[derive(Clone)]
struct Acker {
    client: AsyncClient,
    stats: Arc<LinkStats>,
    /// The number of the current connection. An ack is sent only while this still holds the
    /// number its message came with; the runner moves it on, under the lock, before anything
    /// can be sent on the next connection.
    connection: Arc<Mutex<u64>>,
}

impl Acker {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ack(&self, connection: u64, publish: &Publish) {
        // Held while queueing, so the runner cannot move to a new connection in between.
        let current = self.lock();
        if *current != connection {
            self.stats.stale_acks.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.client.try_ack(publish) {
            Ok(()) => {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            // The message stays in flight at the broker and comes again on the next session.
            Err(e) => tracing::error!(error = %e, "ingest link could not queue an ack"),
        }
    }
}
