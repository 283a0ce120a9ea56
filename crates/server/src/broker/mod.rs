//! The embedded MQTT broker: rmqtt inside our tokio runtime, with mutual TLS against our CA
//! and hooks that enforce identity (certificate CN = client id), the device gate (blocked,
//! revoked) and the topic ACL.
//!
//! Gotchas handled here (see shared/reference): anonymous access is on by default and skips
//! the auth hook; certificate info is only collected when asked; `$share` needs a
//! `SharedSubscription` that says it is supported; the publish hook runs before the ACL, so
//! nothing is ingested from hooks — ingest is an ordinary MQTT client (`crate::ingest`).

pub mod acl;
pub mod gate;
pub mod limits;

use flotilla_proto::truncate_chars as truncate;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use flotilla_proto::{Channel, Direction, Topic};
use rmqtt::codec::types::QoS;
use rmqtt::codec::v5::{PublishAckReason, SubscribeAckReason};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, FromType, Id, LastWill, Publish, PublishAclResult, PublishResult,
    SubscribeAclResult,
};
use tokio::sync::mpsc;

use crate::ingest::writer::{Inbound, Writer};
use crate::store::{AuditRecord, Store};
use acl::{Identity, Listener};
use gate::DeviceGate;
use limits::{Budget, Exceeded, PublishLimits};

/// Largest MQTT packet accepted from a device.
const MAX_PACKET: u32 = 16 * 1024;

/// Disconnects a client from whichever broker the server uses.
#[async_trait]
pub trait BrokerControl: Send + Sync {
    async fn kick(&self, client_id: &str);
    /// Whether a client with this id holds a live connection now.
    async fn is_connected(&self, client_id: &str) -> bool;
}

/// Control over the embedded broker.
pub struct Embedded {
    scx: ServerContext,
}

#[async_trait]
impl BrokerControl for Embedded {
    async fn kick(&self, client_id: &str) {
        let id = Id::from(self.scx.node.id(), client_id.into());
        let entry = self.scx.extends.shared().await.entry(id);
        if let Some(tx) = entry.tx() {
            let _ = tx.unbounded_send(rmqtt::types::Message::Closed(
                rmqtt::types::Reason::from_static("blocked"),
            ));
            tracing::info!(client_id, "disconnected client");
        }
    }

    async fn is_connected(&self, client_id: &str) -> bool {
        let id = Id::from(self.scx.node.id(), client_id.into());
        let entry = self.scx.extends.shared().await.entry(id);
        entry.is_connected().await
    }
}

/// Files the TLS listener reads (rmqtt takes paths only).
#[derive(Debug)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Listener ids: devices connect to one, the server's own clients to the other.
const DEVICE_LISTENER: u16 = 1;
const INTERNAL_LISTENER: u16 = 2;

/// Where the broker listens.
#[derive(Debug, Clone, Copy)]
pub struct BrokerAddrs {
    /// Devices (`--mqtt-addr`).
    pub devices: SocketAddr,
    /// The server's service clients: loopback only, with a deep queue and a wide in-flight
    /// window so ingest can batch hundreds of messages per commit and nothing acknowledged to
    /// a device is dropped for want of queue space.
    pub internal: SocketAddr,
}

/// What the broker needs from the rest of the server.
pub struct BrokerDeps {
    pub gate: Arc<DeviceGate>,
    pub writer: Writer,
    pub limits: PublishLimits,
    pub store: Store,
    pub events: mpsc::UnboundedSender<BrokerEvent>,
}

/// Binds both MQTT/TLS listeners and starts the broker. Returns its control handle and the
/// bound addresses (the configured port may be 0).
pub async fn start(
    addr: SocketAddr,
    tls: TlsFiles<'_>,
    deps: BrokerDeps,
) -> anyhow::Result<(Arc<Embedded>, BrokerAddrs)> {
    let scx = ServerContext::new().build().await;
    *scx.extends.shared_subscription_mut().await = Box::new(RoundRobinShared::default());
    *scx.extends.retain_mut().await = Box::new(PersistentRetain {
        memory: rmqtt::retain::DefaultRetainStorage::default(),
        store: deps.store.clone(),
    });
    let register = scx.extends.hook_mgr().register();
    let hooks = Arc::new(Hooks {
        gate: deps.gate,
        writer: deps.writer,
        limits: deps.limits,
        store: deps.store,
        events: deps.events,
    });
    for t in [
        Type::ClientAuthenticate,
        Type::ClientConnected,
        Type::ClientSubscribeCheckAcl,
        Type::SessionSubscribed,
        Type::MessagePublishCheckAcl,
        Type::MessagePublish,
        Type::ClientDisconnected,
    ] {
        register.add(t, Box::new(SharedHooks(hooks.clone()))).await;
    }
    register.start().await;

    let path = |p: &Path| p.to_string_lossy().to_string();
    let tls_listener = |name: &str, laddr: SocketAddr| {
        Builder::new()
            .name(name)
            .laddr(laddr)
            .allow_anonymous(false)
            .reuseaddr(Some(true))
            // Nagle plus delayed ACKs would add ~40 ms to every CONNECT/CONNACK exchange.
            .nodelay(true)
            .tls_cross_certificate(true)
            .tls_client_ca_certs(Some(path(tls.ca)))
            .tls_cert(Some(path(tls.cert)))
            .tls_key(Some(path(tls.key)))
            .collect_cert_info(true)
    };
    let devices = tls_listener("mqtt/devices", addr)
        .max_packet_size(MAX_PACKET)
        .max_handshaking_limit(4096)
        .bind()
        .with_context(|| format!("binding MQTT listener on {addr}"))?;
    let internal = tls_listener("mqtt/internal", SocketAddr::from(([127, 0, 0, 1], 0)))
        .max_packet_size(64 * 1024)
        .max_inflight(std::num::NonZeroU16::new(4096).unwrap_or(std::num::NonZeroU16::MIN))
        .max_mqueue_len(1_000_000)
        .bind()
        .context("binding internal MQTT listener")?;
    let addrs = BrokerAddrs {
        devices: devices.local_addr()?,
        internal: internal.local_addr()?,
    };
    // Explicit listener ids: the ports may be ephemeral, and rmqtt keys listeners by id.
    let server = MqttServer::new(scx.clone())
        .listener_by_id(
            devices.tls().context("configuring MQTT TLS")?,
            DEVICE_LISTENER,
        )
        .listener_by_id(
            internal.tls().context("configuring internal MQTT TLS")?,
            INTERNAL_LISTENER,
        )
        .build();
    tokio::spawn(async move {
        if let Err(e) = server.run().await {
            tracing::error!(error = %e, "MQTT broker stopped");
        }
    });
    Ok((Arc::new(Embedded { scx }), addrs))
}

/// rmqtt takes one boxed handler per hook type; all of them share one `Hooks`.
struct SharedHooks(Arc<Hooks>);

#[async_trait]
impl Handler for SharedHooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        self.0.hook(param, acc).await
    }
}

/// What the broker tells the rest of the server.
#[derive(Debug)]
pub enum BrokerEvent {
    /// A device's connection closed. A clean DISCONNECT sends no will, so this is the only
    /// sign of it.
    Disconnected { device_id: String, reason: String },
    /// A device subscribed to one of its downward channels: its session (re)started, so what
    /// waits for it on that channel must be sent now.
    Subscribed { device_id: String, channel: Channel },
}

/// Session attribute keys.
const IDENTITY: &str = "flotilla.identity";
const BUDGET: &str = "flotilla.budget";
const CLOSE_REASON: &str = "flotilla.close-reason";

struct Hooks {
    gate: Arc<DeviceGate>,
    writer: Writer,
    limits: PublishLimits,
    store: Store,
    events: mpsc::UnboundedSender<BrokerEvent>,
}

fn listener_of(lid: u16) -> Option<Listener> {
    match lid {
        DEVICE_LISTENER => Some(Listener::Devices),
        INTERNAL_LISTENER => Some(Listener::Internal),
        _ => None,
    }
}

/// The identity and gate decision for a CONNECT.
fn admit(gate: &DeviceGate, info: &ConnectInfo) -> Result<Identity, String> {
    let cert = info.cert();
    let cn = cert.and_then(|c| c.common_name.as_deref());
    let listener = listener_of(info.id().lid()).ok_or("unknown listener")?;
    let will_topic = info.last_will().map(|lw| match lw {
        LastWill::V3(w) => w.topic.clone(),
        LastWill::V5(w) => w.topic.clone(),
    });
    let who = acl::authenticate(cn, info.client_id(), listener, will_topic.as_deref())
        .map_err(|e| e.to_string())?;
    if let Identity::Device(id) = &who {
        let serial = cert.and_then(|c| c.serial.as_deref());
        gate.check(id.as_str(), serial).map_err(|r| {
            match r {
                gate::Refusal::UnknownDevice => "unknown device",
                gate::Refusal::Blocked => "device is blocked",
                gate::Refusal::RevokedCertificate => "certificate revoked",
            }
            .to_string()
        })?;
    }
    Ok(who)
}

/// The identity authentication gave this session; `None` (never authenticated) is refused
/// everything.
async fn identity(session: &Session) -> Option<Identity> {
    session
        .extra_attrs
        .read()
        .await
        .get::<Identity>(IDENTITY)
        .cloned()
}

impl Hooks {
    async fn check_publish(&self, session: &Session, publish: &Publish) -> PublishAclResult {
        let Some(who) = identity(session).await else {
            return PublishAclResult::rejected(true, Some("not authenticated".into()));
        };
        if !acl::may_publish(&who, &publish.topic, publish.retain) {
            tracing::warn!(client_id = %session.id.client_id, topic = %truncate(&publish.topic, 120), retain = publish.retain, "publish refused");
            return PublishAclResult::rejected(false, None);
        }
        let Identity::Device(device) = who else {
            return PublishAclResult::allow();
        };
        let charged = {
            let mut attrs = session.extra_attrs.write().await;
            let now = Instant::now();
            match attrs.get_default_mut(BUDGET.into(), || Budget::new(&self.limits, now)) {
                Some(budget) => budget.charge(&self.limits, publish.payload.len(), now),
                None => Err(Exceeded::Rate),
            }
        };
        match charged {
            Ok(()) => {}
            Err(Exceeded::Size) => {
                tracing::warn!(device = %device, bytes = publish.payload.len(), "publish refused: payload too large");
                return refused(
                    PublishAckReason::PayloadFormatInvalid,
                    Exceeded::Size.reason(),
                    false,
                );
            }
            Err(Exceeded::Rate) => {
                let reason = Exceeded::Rate.reason();
                session
                    .extra_attrs
                    .write()
                    .await
                    .insert(CLOSE_REASON.into(), reason.to_string());
                tracing::warn!(device = %device, reason, "device disconnected");
                self.store
                    .audit(AuditRecord {
                        actor: "broker",
                        action: "device.disconnect",
                        target: Some(device.as_str()),
                        result: "throttled",
                        detail: Some(reason.to_string()),
                    })
                    .await;
                return refused(PublishAckReason::QuotaExceeded, reason, true);
            }
        }
        let msg = Inbound {
            topic: publish.topic.to_string(),
            payload: publish.payload.clone(),
        };
        if publish.qos == QoS::AtMostOnce {
            if !self.writer.submit_lossy(msg) {
                tracing::warn!(device = %device, "QoS 0 message dropped: ingest queue full");
            }
            return PublishAclResult::allow();
        }
        // The device's PUBACK waits for this: rmqtt acknowledges only after the hook returns.
        match self.writer.store(msg).await {
            Ok(()) => PublishAclResult::allow(),
            Err(e) => refused(
                PublishAckReason::ImplementationSpecificError,
                &e.to_string(),
                true,
            ),
        }
    }
}

fn refused(code: PublishAckReason, reason: &str, disconnect: bool) -> PublishAclResult {
    PublishAclResult(PublishResult::reason_code(
        code,
        Some(reason.to_string().into()),
        disconnect,
    ))
}

impl Hooks {
    async fn hook(&self, param: &Parameter<'_>, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let result = match admit(&self.gate, info) {
                    Ok(_) => AuthResult::Allow(false, None),
                    Err(why) => {
                        tracing::warn!(client_id = %truncate(info.client_id(), 80), why, "MQTT connect refused");
                        AuthResult::NotAuthorized
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientConnected(session) => {
                // The same decision as at authentication, from the same certificate, kept on
                // the session for every later check.
                match session.connect_info().await {
                    Ok(info) => match admit(&self.gate, &info) {
                        Ok(who) => session
                            .extra_attrs
                            .write()
                            .await
                            .insert(IDENTITY.into(), who),
                        Err(why) => tracing::warn!(why, "connected session has no identity"),
                    },
                    Err(e) => tracing::warn!(error = %e, "connected session has no connect info"),
                }
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let ok = identity(session).await.is_some_and(|who| {
                    acl::may_subscribe(&who, &sub.topic_filter, sub.is_shared())
                });
                let result = if ok {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    tracing::warn!(client_id = %session.id.client_id, filter = %truncate(&sub.topic_filter, 120), "subscribe refused");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::SessionSubscribed(session, sub) => {
                if let Some(Identity::Device(id)) = identity(session).await
                    && let Ok((_, channel)) = Topic::parse(&sub.topic_filter)
                {
                    let _ = self.events.send(BrokerEvent::Subscribed {
                        device_id: id.to_string(),
                        channel,
                    });
                }
                (true, acc)
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let result = self.check_publish(session, publish).await;
                (false, Some(HookResult::PublishAclResult(result)))
            }
            Parameter::MessagePublish(Some(session), from, publish)
                if matches!(from.typ(), FromType::LastWill) =>
            {
                // Wills skip the publish ACL; authentication admitted only the device's own
                // status topic as one.
                if let Some(Identity::Device(_)) = identity(session).await {
                    let _ = self.writer.submit(Inbound {
                        topic: publish.topic.to_string(),
                        payload: publish.payload.clone(),
                    });
                }
                (true, acc)
            }
            Parameter::ClientDisconnected(session, reason) => {
                let attrs = session.extra_attrs.read().await;
                if let Some(Identity::Device(id)) = attrs.get::<Identity>(IDENTITY) {
                    let reason = match attrs.get::<String>(CLOSE_REASON) {
                        Some(r) => r.clone(),
                        None => truncate(&reason.to_string(), 120).to_string(),
                    };
                    let _ = self.events.send(BrokerEvent::Disconnected {
                        device_id: id.to_string(),
                        reason,
                    });
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// Spreads shared-subscription deliveries over the group's online members in turn.
#[derive(Default)]
struct RoundRobinShared {
    next: AtomicUsize,
}

#[async_trait]
impl rmqtt::subscribe::SharedSubscription for RoundRobinShared {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &rmqtt::types::SharedGroup,
        _publisher: &rmqtt::types::Id,
        _topic: &rmqtt::types::TopicName,
        candidates: &[(
            rmqtt::types::NodeId,
            rmqtt::types::ClientId,
            rmqtt::types::SubscriptionOptions,
            Option<Vec<rmqtt::types::SubscriptionIdentifier>>,
            Option<rmqtt::types::IsOnline>,
        )],
    ) -> Option<(usize, rmqtt::types::IsOnline)> {
        if candidates.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Prefer an online member so a message is not parked on a disconnected one.
        (0..candidates.len())
            .map(|k| (start + k) % candidates.len())
            .find(|&i| candidates[i].4.unwrap_or(true))
            .or(Some(start % candidates.len()))
            .map(|i| (i, candidates[i].4.unwrap_or(true)))
    }
}

/// Retained messages: in memory for delivery, and the ones the server publishes (downward
/// channels, such as desired config) also in the database, so they survive a restart; the
/// server publishes those again at start-up. rmqtt's default store refuses retained messages
/// (and with them every will with the retain flag), yet its trie works; this enables it.
/// Retained topics are bounded by the ACL: the status and the downward topics of each device.
struct PersistentRetain {
    memory: rmqtt::retain::DefaultRetainStorage,
    store: Store,
}

#[async_trait]
impl rmqtt::retain::RetainStorage for PersistentRetain {
    fn enable(&self) -> bool {
        true
    }

    async fn set(
        &self,
        topic: &rmqtt::types::TopicName,
        retain: rmqtt::types::Retain,
        expiry: Option<std::time::Duration>,
    ) -> rmqtt::Result<()> {
        let server_published =
            Topic::parse(topic).is_ok_and(|(_, c)| c.direction() == Direction::Down);
        if server_published {
            let qos = retain.publish.qos as u8;
            if let Err(e) = self
                .store
                .set_retained(topic, &retain.publish.payload, qos)
                .await
            {
                tracing::error!(error = %e, topic = %truncate(topic, 120), "storing retained message failed");
            }
        }
        self.memory.set_with_timeout(topic, retain, expiry).await
    }

    async fn get(
        &self,
        filter: &rmqtt::types::TopicFilter,
    ) -> rmqtt::Result<Vec<(rmqtt::types::TopicName, rmqtt::types::Retain)>> {
        self.memory.get_message(filter).await
    }

    async fn count(&self) -> isize {
        rmqtt::retain::RetainStorage::count(&self.memory).await
    }

    async fn max(&self) -> isize {
        rmqtt::retain::RetainStorage::max(&self.memory).await
    }
}
