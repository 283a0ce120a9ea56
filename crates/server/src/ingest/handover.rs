//! Which server connects as which ingest session, with replicas on an external broker.
//!
//! Each replica's ingest session (`svc:server-ingest-<replica id>`) sits in the broker's
//! shared subscription, and the broker keeps queueing that replica's share of device messages
//! in the session while the replica is away. A replica that never returns would leave them
//! there until the session expires, unstored though the devices were acknowledged. So:
//!
//! - each replica holds the lease `ingest:<replica id>` (holder: the replica id, so a restart
//!   under the same id takes it back at once) and its link connects only while it does;
//! - every replica looks for lapsed `ingest:` leases of peers. The one that takes such a
//!   lease connects as the peer's session, unsubscribes it from the shared subscription (the
//!   broker stops giving it a share), stores and acks what the session held until nothing
//!   more arrives, disconnects, and ends the lease. The session stays at the broker, empty and
//!   subscribed to nothing, until it expires or the peer returns and subscribes it again;
//! - if anything fails mid-way (the connection, the lease), the adopter gives the lease up
//!   unended: whoever takes it next (another peer, or the replica itself) finds the session
//!   where this one left it, and every message not acked is delivered again.
//!
//! The broker lets the peer's session be taken because the adopter shows a certificate for
//! that client id, issued from the CA the replicas share.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_pki::CertificateAuthority;
use flotilla_store::Store;
use rumqttc::v5::Event;
use rumqttc::v5::mqttbytes::v5::Packet;
use tokio::sync::watch;

use super::link::{self, Claim, Intake, LinkStats};
use super::writer::Writer;
use crate::broker::gate::DeviceGate;
use crate::service_link::ServiceLink;

const PREFIX: &str = "ingest:";
/// How long an ingest lease outlives its holder's last renewal.
pub const TTL: Duration = Duration::from_secs(10);
/// How often replicas look for lapsed peers.
const SCAN: Duration = Duration::from_secs(3);
/// How long past its lapse a peer's lease is left to its holder: after an outage of the
/// database that every replica saw, each renews its own lease within a renewal interval of
/// the database's return, long before a peer would take it.
const GRACE: Duration = TTL;
/// A session is drained once nothing arrived for this long after it was unsubscribed and
/// everything taken is committed.
const QUIET: Duration = Duration::from_secs(2);
/// The certificate an adopter connects with: one drain's worth.
const ADOPTER_CERT: Duration = Duration::from_secs(3600);

fn ttl_ms() -> i64 {
    i64::try_from(TTL.as_millis()).unwrap_or(i64::MAX)
}

/// The client id of a replica's ingest session.
pub fn session_id(replica: &str) -> String {
    format!(
        "{}{}",
        flotilla_pki::SERVICE_PREFIX,
        session_service(replica)
    )
}

/// The service name (certificate CN after the `svc:` prefix) of a replica's ingest session.
pub fn session_service(replica: &str) -> String {
    format!("server-ingest-{replica}")
}

/// Holds `replica`'s own ingest lease, renewed every third of its time to live; the claim
/// says whether the link may connect. A failed renewal withdraws the claim: unsure whether
/// it still holds the lease, the link does not start another connection.
pub fn claim_own(store: Store, replica: String) -> Claim {
    let (tx, claim) = watch::channel(false);
    let lease = format!("{PREFIX}{replica}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TTL / 3);
        loop {
            tick.tick().await;
            // Bounded, so the claim is never older than two thirds of the lease: a renewal
            // hanging on the database withdraws it before the lease can lapse and a peer
            // take the session.
            let renewal = store.hold_lease(&lease, &replica, ttl_ms());
            let held = match tokio::time::timeout(TTL / 3, renewal).await {
                Ok(Ok(held)) => held.is_some(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "renewing the ingest lease failed");
                    false
                }
                Err(_) => {
                    tracing::warn!("renewing the ingest lease timed out");
                    false
                }
            };
            if *tx.borrow() != held {
                tracing::info!(%lease, held, "ingest lease changed");
            }
            if tx.send(held).is_err() {
                return;
            }
        }
    });
    claim
}

/// What an adopter needs to drain a peer's session.
pub struct Adopter {
    /// This replica's own claim: a replica that does not hold its own lease (cut off from
    /// the database, or drained itself) adopts nobody, so two replicas that both lost their
    /// leases never unsubscribe each other's sessions and leave the broker without a
    /// subscriber.
    pub own: Claim,
    /// This replica's own link: one whose session is not subscribed (reconnecting, refused)
    /// adopts nobody either, so some session always takes what the broker is sent.
    pub link: link::IngestLink,
    pub store: Store,
    pub ca: Arc<CertificateAuthority>,
    /// The broker, with a certificate to be replaced by one for the peer's session.
    pub broker: ServiceLink,
    /// This replica's id.
    pub replica: String,
    /// What a drained session is unsubscribed from: every filter a replica may hold.
    pub filters: Vec<String>,
    pub writer: Writer,
    pub gate: Arc<DeviceGate>,
    /// The server's own link's, so what was adopted counts in the same figures.
    pub stats: Arc<LinkStats>,
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// Everything the session held is stored and acked; it is subscribed to nothing.
    Done,
    /// The broker kept no session: nothing to drain.
    NoSession,
}

impl Adopter {
    /// Looks for lapsed peers every few seconds and drains each one it wins.
    pub fn spawn(self) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SCAN).await;
                if !*self.own.borrow() || !self.link.is_subscribed() {
                    continue;
                }
                let grace = i64::try_from(GRACE.as_millis()).unwrap_or(i64::MAX);
                let lapsed = match self.store.lapsed_leases(PREFIX, grace).await {
                    Ok(lapsed) => lapsed,
                    Err(e) => {
                        tracing::warn!(error = %e, "looking for lapsed ingest leases failed");
                        continue;
                    }
                };
                for lease in lapsed {
                    let Some(peer) = lease.strip_prefix(PREFIX) else {
                        continue;
                    };
                    if peer != self.replica {
                        self.adopt(&lease, peer).await;
                    }
                }
            }
        });
    }

    /// Takes `peer`'s lease if nobody else did, drains its session, and ends the lease.
    async fn adopt(&self, lease: &str, peer: &str) {
        // Not a replica id (they have no '/'): nobody else holds a lease under this name.
        let holder = format!("{}/adopting", self.replica);
        // Only a lease that still exists and has lapsed: one another adopter ended meanwhile
        // is not made again.
        match self.store.take_lapsed_lease(lease, &holder, ttl_ms()).await {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, %lease, "taking a lapsed ingest lease failed");
                return;
            }
        }
        tracing::warn!(%peer, "replica's ingest lease lapsed: draining its session at the broker");
        let (lost_tx, lost) = watch::channel(false);
        let renewing = {
            let (store, lease, holder) = (self.store.clone(), lease.to_string(), holder.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TTL / 3);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if !matches!(
                        store.hold_lease(&lease, &holder, ttl_ms()).await,
                        Ok(Some(_))
                    ) {
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            })
        };
        let outcome = self.drain(peer, lost).await;
        renewing.abort();
        let ended = match &outcome {
            Ok(how) => {
                tracing::info!(%peer, ?how, "drained a lapsed replica's ingest session");
                if *how == Drained::Done {
                    self.stats
                        .adopted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.store.end_lease(lease, &holder).await.map(|_| ())
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "draining a lapsed replica's session stopped; it is left for the next to try");
                self.store.release_lease(lease, &holder).await
            }
        };
        if let Err(e) = ended {
            tracing::warn!(error = %e, %lease, "giving up an ingest lease failed; it lapses");
        }
    }

    /// Connects as `peer`'s session and drains it. Stops with an error when the connection
    /// fails, the lease is `lost`, or a message arrives once the drain was judged done.
    ///
    /// The event loop is never cancelled mid-poll (a request it took from its queue, an ack,
    /// would be lost with it); a watchdog decides when to stop and asks the loop to disconnect.
    async fn drain(&self, peer: &str, lost: watch::Receiver<bool>) -> anyhow::Result<Drained> {
        let cert = self
            .ca
            .issue_service_certificate_valid_for(&session_service(peer), ADOPTER_CERT)?;
        let mut link = ServiceLink {
            identity: crate::rotation::fixed(cert),
            ..self.broker.clone()
        };
        let (client, mut eventloop) =
            link::new_client(link::session_options(&mut link, &session_id(peer)));
        let intake = Arc::new(Intake::new(
            client.clone(),
            self.writer.clone(),
            self.gate.clone(),
            self.stats.clone(),
        ));
        let connection = intake.connection();
        let progress = Arc::new(Mutex::new(Progress {
            unsubscribing: None,
            last_heard: Instant::now(),
            stop: None,
        }));
        let watchdog = tokio::spawn(watch_drain(
            progress.clone(),
            intake.clone(),
            client.clone(),
            lost,
        ));
        let result = async {
            loop {
                match eventloop.poll().await? {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        if !ack.session_present {
                            lock(&progress).stop = Some(Stop::NoSession);
                            client.try_disconnect()?;
                            continue;
                        }
                        for filter in &self.filters {
                            client.try_unsubscribe(filter.clone())?;
                        }
                        lock(&progress).unsubscribing = Some(self.filters.len());
                    }
                    Event::Incoming(Packet::UnsubAck(ack)) => {
                        // Refused, the session would go on taking its share with nobody to
                        // drain it.
                        use rumqttc::v5::mqttbytes::v5::UnsubAckReason;
                        if let Some(refused) = ack.reasons.iter().find(|r| {
                            !matches!(
                                r,
                                UnsubAckReason::Success | UnsubAckReason::NoSubscriptionExisted
                            )
                        }) {
                            anyhow::bail!(
                                "the broker refused to unsubscribe the session: {refused:?}"
                            );
                        }
                        let mut p = lock(&progress);
                        p.unsubscribing = p.unsubscribing.map(|n| n.saturating_sub(1));
                        p.last_heard = Instant::now();
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        {
                            let mut p = lock(&progress);
                            if p.stop.is_some() {
                                // Left unacked in the session, for the next drain.
                                anyhow::bail!("a message arrived after the drain was judged done");
                            }
                            p.last_heard = Instant::now();
                        }
                        let Some(permit) = intake.permit().await else {
                            anyhow::bail!("intake closed");
                        };
                        intake.take(connection, publish, permit);
                    }
                    Event::Outgoing(rumqttc::Outgoing::Disconnect) => {
                        let stop = lock(&progress).stop;
                        let drained = match stop {
                            Some(Stop::Drained) => Drained::Done,
                            Some(Stop::NoSession) => Drained::NoSession,
                            Some(Stop::LeaseLost) | None => {
                                anyhow::bail!("the ingest lease was lost")
                            }
                        };
                        // What the broker sent before it read the DISCONNECT (an ack frees a
                        // slot of its window, and it sends the next queued message at once)
                        // would stay unacked in a session nobody drains: read until it closes.
                        closed_without_more(&mut eventloop).await?;
                        anyhow::ensure!(
                            !intake.lost_any(),
                            "a message of the session could not be acknowledged"
                        );
                        return Ok(drained);
                    }
                    _ => {}
                }
            }
        }
        .await;
        watchdog.abort();
        // Commits still under way after a failure must not ack on a connection that is gone.
        intake.close_connection();
        result
    }
}

/// Where a drain stands, shared by its event loop and its watchdog.
struct Progress {
    /// Unsubscriptions not yet acknowledged, once sent.
    unsubscribing: Option<usize>,
    last_heard: Instant,
    /// Why the drain is disconnecting, once decided.
    stop: Option<Stop>,
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Drained,
    NoSession,
    LeaseLost,
}

fn lock(progress: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(|p| p.into_inner())
}

/// Asks the drain to disconnect once its session is drained (unsubscribed, everything taken
/// committed, nothing heard for [`QUIET`]) or its lease is lost.
async fn watch_drain(
    progress: Arc<Mutex<Progress>>,
    intake: Arc<Intake>,
    client: rumqttc::v5::AsyncClient,
    lost: watch::Receiver<bool>,
) {
    loop {
        tokio::time::sleep(QUIET / 4).await;
        let stop = {
            let mut p = lock(&progress);
            if p.stop.is_some() {
                return;
            }
            // Quiet counts from the last commit too: a broker sends the next queued message
            // when an ack frees a slot of its window.
            if !intake.idle() {
                p.last_heard = Instant::now();
            }
            let drained = p.unsubscribing == Some(0) && p.last_heard.elapsed() >= QUIET;
            let why = if *lost.borrow() {
                Some(Stop::LeaseLost)
            } else {
                drained.then_some(Stop::Drained)
            };
            p.stop = why;
            why
        };
        if stop.is_some() {
            if let Err(e) = client.try_disconnect() {
                tracing::warn!(error = %e, "could not ask a drain to disconnect");
            }
            return;
        }
    }
}

/// Polls until the broker closes the connection after a DISCONNECT; an error if a message
/// arrives first (it is left unacked, for the next drain) or the close takes over 5 s.
async fn closed_without_more(eventloop: &mut rumqttc::v5::EventLoop) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // Cancelling here drops nothing of ours: every ack was sent before the DISCONNECT.
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Err(_)) => return Ok(()),
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                anyhow::bail!("a message arrived after the DISCONNECT")
            }
            Ok(Ok(_)) => {}
            Err(_) => anyhow::bail!("the broker did not close the connection within 5 s"),
        }
    }
}
