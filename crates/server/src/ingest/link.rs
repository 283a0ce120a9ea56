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
//! Handle/runner split: one task owns the event loop; each message's wait for its commit runs
//! on a task of its own. At most [`MAX_WAITING`] messages wait at once, across connections (a
//! broker redelivers its whole in-flight window on every reconnect); at the bound the runner
//! waits for commits to catch up and polls nothing meanwhile (no pings, no acks), so a stall
//! longer than 1.5 keep-alives (22 s) costs a reconnect and a redelivery, never a message.
//!
//! Acks go out in commit order, which may differ from arrival order (MQTT asks for arrival
//! order; Mosquitto does not depend on it).
//!
//! Messages from devices the gate says are blocked are acknowledged and dropped: the server
//! cannot disconnect them from an external broker.
//!
//! The link connects only while its [`Claim`] allows: with replicas, the session is the
//! replica's to use only while it holds its ingest lease, so a peer draining the session of a
//! replica it took for dead ([`super::handover`]) and the replica itself do not take it from
//! each other in turn (as long as their clocks agree: leases compare them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::Topic;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::writer::{Inbound, Writer};
use crate::broker::gate::DeviceGate;
use crate::service_link::ServiceLink;

/// Messages the broker may have in flight to this client; each holds a task until committed.
pub const RECEIVE_MAXIMUM: u16 = 1024;

/// Messages taken and not yet committed, across connections.
pub const MAX_WAITING: usize = 2 * RECEIVE_MAXIMUM as usize;

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
    /// Messages from blocked devices, acknowledged and dropped.
    pub blocked: AtomicU64,
    /// Sessions of lapsed peers this server took over and drained.
    pub adopted: AtomicU64,
    /// Acks that found the client's queue full ([`REQUEST_QUEUE`]).
    pub unsent_acks: AtomicU64,
    /// Retired filters the broker confirmed this link's session no longer holds.
    pub retired: AtomicU64,
}

/// Whether a link may connect now. A link that lost its claim stays on the connection it has
/// (the broker ends it when another client takes the session) and waits before the next.
pub type Claim = watch::Receiver<bool>;

/// A claim that always holds: the only server on its broker session.
pub fn always() -> Claim {
    watch::channel(true).1
}

/// The options of a link that keeps its session: a persistent session with manual acks.
pub fn session_options(link: &mut ServiceLink, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut options = link.options(client_id);
    options
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_manual_acks(true)
        .set_receive_maximum(Some(RECEIVE_MAXIMUM));
    options
}

/// Where the link stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Connecting,
    /// The broker confirmed every subscription of this session.
    Subscribed,
    /// The broker refused a subscription (an ACL that does not grant it): nothing arrives.
    Refused(String),
}

/// Handle to a running link.
#[derive(Debug, Clone)]
pub struct IngestLink {
    pub stats: Arc<LinkStats>,
    state: watch::Receiver<State>,
}

impl IngestLink {
    /// Connects as `client_id` whenever `claim` allows, subscribes to `filters` at QoS 1 at
    /// every session start (and on a resumed session unsubscribes `retired`, filters an
    /// earlier version subscribed), and starts the runner.
    pub fn start(
        mut link: ServiceLink,
        client_id: &str,
        (filters, retired): (Vec<String>, Vec<String>),
        writer: Writer,
        gate: Arc<DeviceGate>,
        claim: Claim,
    ) -> IngestLink {
        let (client, eventloop) = new_client(session_options(&mut link, client_id));
        let stats = Arc::new(LinkStats::default());
        let (state_tx, state) = watch::channel(State::Connecting);
        let runner = Runner {
            intake: Intake::new(client, writer, gate, stats.clone()),
            filters,
            retired,
            state: state_tx,
            link,
            claim,
        };
        tokio::spawn(runner.run(eventloop));
        IngestLink { stats, state }
    }

    /// Whether the broker confirmed this session's subscriptions and it is connected.
    pub fn is_subscribed(&self) -> bool {
        *self.state.borrow() == State::Subscribed
    }

    /// Waits until the broker confirmed the subscriptions; an error says why it refused one.
    pub async fn subscribed(&mut self) -> Result<(), String> {
        match self
            .state
            .wait_for(|s| *s != State::Connecting)
            .await
            .map(|s| s.clone())
        {
            Ok(State::Refused(why)) => Err(why),
            Ok(_) => Ok(()),
            Err(_) => Err("ingest link stopped".into()),
        }
    }
}

/// Acks (and the odd subscription) the client's queue holds before `try_ack` fails. A
/// message's permit is given back once its ack is queued, not once it is sent, and rumqttc's
/// event loop takes one request from the queue per packet it reads from the network at
/// most, so while a broker floods the link (Mosquitto sends a resumed session's whole backlog,
/// beyond the receive maximum) acks pile up here faster than they leave. Measured: a drain of
/// a few thousand queued messages overflowed a queue of 2,064 (the bound this replaced).
/// The queue grows as it fills, so its size costs nothing until used.
const REQUEST_QUEUE: usize = 64 * 1024;

/// A client for a link; see [`REQUEST_QUEUE`].
pub fn new_client(options: rumqttc::v5::MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options, REQUEST_QUEUE)
}

struct Runner {
    filters: Vec<String>,
    /// Subscriptions a resumed session may still hold from an earlier version.
    retired: Vec<String>,
    /// Also how the runner reaches the client and the stats.
    intake: Intake,
    state: watch::Sender<State>,
    /// Its certificate, renewed while the server runs.
    link: ServiceLink,
    claim: Claim,
}

impl Runner {
    async fn run(mut self, mut eventloop: EventLoop) {
        let mut current = 0;
        let mut connected = false;
        loop {
            if !connected {
                if !*self.claim.borrow() {
                    tracing::info!("ingest link: waiting for this replica's ingest lease");
                }
                if self.claim.wait_for(|may| *may).await.is_err() {
                    return;
                }
                connected = true;
            }
            if self.link.refresh(&mut eventloop.options) {
                tracing::info!(
                    "ingest link: renewed service certificate ready for the next connection"
                );
            }
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.intake
                        .acker
                        .stats
                        .sessions
                        .fetch_add(1, Ordering::Relaxed);
                    if ack.session_present {
                        self.intake
                            .acker
                            .stats
                            .resumed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // Sent at every session start: a broker that lost the session lost the
                    // subscription with it.
                    let filters = self
                        .filters
                        .iter()
                        .map(|f| Filter::new(f, QoS::AtLeastOnce));
                    if let Err(e) = self.intake.acker.client.try_subscribe_many(filters) {
                        tracing::error!(error = %e, "ingest link could not subscribe");
                    }
                    // What the session queued for them is delivered all the same.
                    for filter in self.retired.iter().filter(|_| ack.session_present) {
                        if let Err(e) = self.intake.acker.client.try_unsubscribe(filter.clone()) {
                            tracing::error!(error = %e, "ingest link could not unsubscribe a retired filter");
                        }
                    }
                    tracing::info!(resumed = ack.session_present, "ingest link connected");
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused: Vec<_> = ack
                        .return_codes
                        .iter()
                        // QoS 0 granted would make ingest lossy without a word: refused too.
                        .filter(|c| !matches!(c, SubscribeReasonCode::Success(QoS::AtLeastOnce)))
                        .collect();
                    if refused.is_empty() {
                        let _ = self.state.send(State::Subscribed);
                    } else {
                        let why = format!("subscriptions refused: {refused:?}");
                        tracing::error!(%why, "the broker refused ingest; no device message reaches this server");
                        let _ = self.state.send(State::Refused(why));
                    }
                }
                Ok(Event::Incoming(Packet::UnsubAck(ack))) => {
                    // Only retired filters are ever unsubscribed here; "no subscription
                    // existed" is as good as gone.
                    use rumqttc::v5::mqttbytes::v5::UnsubAckReason;
                    let gone = ack.reasons.iter().filter(|r| {
                        matches!(
                            r,
                            UnsubAckReason::Success | UnsubAckReason::NoSubscriptionExisted
                        )
                    });
                    let gone = gone.count() as u64;
                    self.intake
                        .acker
                        .stats
                        .retired
                        .fetch_add(gone, Ordering::Relaxed);
                    if gone < ack.reasons.len() as u64 {
                        tracing::error!(reasons = ?ack.reasons, "the broker refused to unsubscribe a retired ingest filter");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // At the bound, wait here: the broker holds what is not taken yet.
                    let Some(permit) = self.intake.permit().await else {
                        return;
                    };
                    self.intake.take(current, publish, permit);
                }
                Ok(_) => {}
                Err(e) => {
                    connected = false;
                    let _ = self.state.send(State::Connecting);
                    {
                        let mut connection = self.intake.acker.lock();
                        *connection += 1;
                        current = *connection;
                        // The event loop dropped the acks queued so far when the connection
                        // failed; acks queued since (commits that ended in between) are
                        // dropped now, before the next connection exists. Packets read from
                        // the old connection and not yet handed out go too: they would be
                        // taken as the new connection's. The broker sends them again.
                        eventloop.clean();
                        eventloop.state.events.clear();
                        // clean() keeps PUBREC (QoS 2); none is expected at a QoS 1
                        // subscription, and none may reach the next connection either.
                        eventloop
                            .pending
                            .retain(|r| !matches!(r, rumqttc::v5::Request::PubRec(_)));
                    }
                    tracing::warn!(error = %e, "ingest link lost its connection; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// The taking half of a link: hands each message to the writer and acks it after its commit,
/// on the connection it came on.
pub struct Intake {
    writer: Writer,
    gate: Arc<DeviceGate>,
    /// One permit for each message taken and not yet committed.
    waiting: Arc<Semaphore>,
    acker: Acker,
}

impl Intake {
    pub fn new(
        client: AsyncClient,
        writer: Writer,
        gate: Arc<DeviceGate>,
        stats: Arc<LinkStats>,
    ) -> Intake {
        Intake {
            writer,
            gate,
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
            acker: Acker {
                client,
                stats,
                connection: Arc::new(Mutex::new(0)),
                unsent: Arc::new(AtomicU64::new(0)),
            },
        }
    }

    /// Room for one more message; waits at the bound. `None` once closed (never, in practice).
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.waiting.clone().acquire_owned().await.ok()
    }

    /// Whether every message taken so far is committed (and its ack queued) or dropped.
    pub fn idle(&self) -> bool {
        self.waiting.available_permits() == MAX_WAITING
    }

    /// The connection is gone: acks of its messages are dropped from now on.
    pub fn close_connection(&self) {
        *self.acker.lock() += 1;
    }

    /// Whether a message taken here was neither stored nor acknowledged (its ack found the
    /// queue full, or the writer stopped): the broker still holds it.
    pub fn lost_any(&self) -> bool {
        self.acker.unsent.load(Ordering::Relaxed) > 0
    }

    /// The number acks of the connection that is open now go by.
    pub fn connection(&self) -> u64 {
        *self.acker.lock()
    }

    /// Hands a message to the writer; its ack follows the commit.
    pub fn take(&self, connection: u64, publish: Publish, permit: OwnedSemaphorePermit) {
        self.acker.stats.received.fetch_add(1, Ordering::Relaxed);
        let Ok(topic) = std::str::from_utf8(&publish.topic).map(str::to_string) else {
            // Not a topic any device may use; nothing to store, and redelivery would not help.
            tracing::warn!("ingest link got a non-UTF-8 topic; acknowledged and dropped");
            self.acker.ack(connection, &publish);
            return;
        };
        if let Ok((device, _)) = Topic::parse(&topic)
            && self.gate.is_blocked(device.as_str())
        {
            self.acker.stats.blocked.fetch_add(1, Ordering::Relaxed);
            self.acker.ack(connection, &publish);
            return;
        }
        let msg = Inbound::new(topic, Bytes::clone(&publish.payload));
        if publish.qos == QoS::AtMostOnce {
            self.writer.submit_lossy(msg);
            return;
        }
        // Queued here, in the order the broker delivered; only the wait for the commit runs
        // on its own task.
        let durable = self.writer.queue_durable(msg);
        let acker = self.acker.clone();
        tokio::spawn(async move {
            let stored = match durable {
                Ok(durable) => durable.await,
                Err(stopped) => Err(stopped),
            };
            if stored.is_ok() {
                acker.ack(connection, &publish);
            } else {
                acker.unsent.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
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
    /// Messages of this intake neither stored nor acknowledged.
    unsent: Arc<AtomicU64>,
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
        if publish.qos == QoS::AtMostOnce {
            return;
        }
        match self.client.try_ack(publish) {
            Ok(()) => {
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            // The message holds one slot of the broker's window until the next reconnect, when
            // the broker sends it again (and the store keeps it once). Counted: a test
            // asserts none.
            Err(e) => {
                self.stats.unsent_acks.fetch_add(1, Ordering::Relaxed);
                self.unsent.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "ingest link could not queue an ack");
            }
        }
    }
}
