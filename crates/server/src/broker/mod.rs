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

use flotilla_proto::truncate_chars as truncate;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::types::{AuthResult, Id, PublishAclResult, SubscribeAclResult};

use acl::Identity;
use gate::DeviceGate;
use tokio::sync::mpsc;

/// Largest MQTT packet accepted from any client.
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

/// Binds both MQTT/TLS listeners and starts the broker. Returns its control handle and the
/// bound addresses (the configured port may be 0).
pub async fn start(
    addr: SocketAddr,
    tls: TlsFiles<'_>,
    gate: Arc<DeviceGate>,
    disconnects: mpsc::UnboundedSender<Disconnected>,
) -> anyhow::Result<(Arc<Embedded>, BrokerAddrs)> {
    let scx = ServerContext::new().build().await;
    *scx.extends.shared_subscription_mut().await = Box::new(RoundRobinShared::default());
    *scx.extends.retain_mut().await = Box::new(MemoryRetain::default());
    let register = scx.extends.hook_mgr().register();
    for t in [
        Type::ClientAuthenticate,
        Type::ClientSubscribeCheckAcl,
        Type::MessagePublishCheckAcl,
        Type::ClientDisconnected,
    ] {
        let hooks = Hooks {
            gate: gate.clone(),
            disconnects: disconnects.clone(),
        };
        register.add(t, Box::new(hooks)).await;
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

/// A device's connection closed. A clean DISCONNECT sends no will, so this is the only sign.
#[derive(Debug)]
pub struct Disconnected {
    pub device_id: String,
    pub reason: String,
}

struct Hooks {
    gate: Arc<DeviceGate>,
    disconnects: mpsc::UnboundedSender<Disconnected>,
}

#[async_trait]
impl Handler for Hooks {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(info) => {
                let client_id = info.client_id().to_string();
                let cert = info.cert();
                let cn = cert.and_then(|c| c.common_name.as_deref());
                let serial = cert.and_then(|c| c.serial.as_deref());
                let verdict = match cn.and_then(|cn| Identity::from_certificate(cn, &client_id)) {
                    None => Err("certificate CN missing or different from client id"),
                    Some(Identity::Service(_)) => Ok(()),
                    Some(Identity::Device(id)) => {
                        self.gate.check(id.as_str(), serial).map_err(|r| match r {
                            gate::Refusal::UnknownDevice => "unknown device",
                            gate::Refusal::Blocked => "device is blocked",
                            gate::Refusal::RevokedCertificate => "certificate revoked",
                        })
                    }
                };
                let result = match verdict {
                    Ok(()) => AuthResult::Allow(false, None),
                    Err(why) => {
                        tracing::warn!(client_id = %truncate(&client_id, 80), why, "MQTT connect refused");
                        AuthResult::NotAuthorized
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let who = Identity::from_client_id(&session.id.client_id);
                let ok = acl::may_subscribe(&who, &sub.topic_filter, sub.is_shared());
                let result = if ok {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    tracing::warn!(client_id = %session.id.client_id, filter = %truncate(&sub.topic_filter, 120), "subscribe refused");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let who = Identity::from_client_id(&session.id.client_id);
                let result = if acl::may_publish(&who, &publish.topic) {
                    PublishAclResult::allow()
                } else {
                    tracing::warn!(client_id = %session.id.client_id, topic = %truncate(&publish.topic, 120), "publish refused");
                    PublishAclResult::rejected(false, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            Parameter::ClientDisconnected(session, reason) => {
                if let Identity::Device(id) = Identity::from_client_id(&session.id.client_id) {
                    let reason = reason.to_string();
                    let reason = truncate(&reason, 120).to_string();
                    let _ = self.disconnects.send(Disconnected {
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

/// Retained messages in memory. rmqtt's default store refuses them (and with them every will
/// with the retain flag), yet its trie works; this enables it. Retained topics are bounded by
/// the ACL: at most the status and config topic of each device.
#[derive(Default)]
struct MemoryRetain(rmqtt::retain::DefaultRetainStorage);

#[async_trait]
impl rmqtt::retain::RetainStorage for MemoryRetain {
    fn enable(&self) -> bool {
        true
    }

    async fn set(
        &self,
        topic: &rmqtt::types::TopicName,
        retain: rmqtt::types::Retain,
        expiry: Option<std::time::Duration>,
    ) -> rmqtt::Result<()> {
        self.0.set_with_timeout(topic, retain, expiry).await
    }

    async fn get(
        &self,
        filter: &rmqtt::types::TopicFilter,
    ) -> rmqtt::Result<Vec<(rmqtt::types::TopicName, rmqtt::types::Retain)>> {
        self.0.get_message(filter).await
    }

    async fn count(&self) -> isize {
        rmqtt::retain::RetainStorage::count(&self.0).await
    }

    async fn max(&self) -> isize {
        rmqtt::retain::RetainStorage::max(&self.0).await
    }
}
