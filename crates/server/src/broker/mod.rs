//! The embedded MQTT broker: rmqtt inside our tokio runtime, with mutual TLS against our CA
//! and one access boundary in its hooks: authentication turns the certificate into an
//! [`Identity`] kept on the session, and every later decision (publish, subscribe, retain,
//! will, limits) uses it; a session without one is refused everything.
//!
//! It is also where device messages are stored. rmqtt sends a QoS 1 PUBACK only after the
//! publish hooks return (`Session::publish`: `message_publish`, then
//! `message_publish_check_acl`, then forward, then the ack), so the ACL hook, once it has
//! allowed a device's message, awaits the ingest writer's group commit: a PUBACK means stored.
//! The `message_publish` hook runs before the ACL, so it stores only wills, which skip the
//! ACL and were checked at CONNECT instead.
//!
//! Gotchas handled here (see shared/reference): anonymous access is on by default and skips
//! the auth hook; certificate info is only collected when asked; `$share` needs a
//! `SharedSubscription` that says it is supported.

pub mod acl;
pub mod front_door;
pub mod gate;
pub mod limits;

use flotilla_proto::truncate_chars as truncate;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;
use flotilla_proto::{Channel, DeviceId, Topic};
use rmqtt::codec::types::QoS;
use rmqtt::codec::v5::{PublishAckReason, SubscribeAckReason};
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::{Builder, Listener as RmqttListener};
use rmqtt::server::MqttServer;
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, FromType, Id, LastWill, Publish, PublishAclResult, PublishResult,
    SubscribeAclResult,
};
use tokio::sync::mpsc;

use crate::ingest::writer::{Inbound, Writer};
use acl::{Identity, Listener};
use flotilla_store::{AuditRecord, Store};
use gate::DeviceGate;
use limits::{DeviceLimiter, Exceeded, PublishLimits};

/// Largest MQTT packet accepted from a device.
const MAX_PACKET: u32 = 16 * 1024;

/// Disconnects a client from whichever broker the server uses.
#[async_trait]
pub trait BrokerControl: Send + Sync {
    async fn kick(&self, client_id: &str);
    /// Whether a client with this id holds a live connection now.
    async fn is_connected(&self, client_id: &str) -> bool;
    /// What the server's link to the broker did, when it has one of its own to report.
    fn link_stats(&self) -> Option<serde_json::Value> {
        None
    }
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

/// Control over an external broker, as far as it goes today: the server cannot disconnect a
/// client there itself (the ingest link drops a blocked device's messages; `flotilla-server
/// broker-sync` beside the broker closes sessions and updates its CRL and ACL), and it does not
/// see connections, so every device counts as not connected and presence follows the devices'
/// status messages and wills.
pub struct External {
    pub ingest: crate::ingest::link::IngestLink,
}

#[async_trait]
impl BrokerControl for External {
    async fn kick(&self, client_id: &str) {
        tracing::warn!(
            client_id,
            "external broker: this client is not disconnected by the server; its certificate stays accepted there until the broker's CRL says otherwise"
        );
    }

    async fn is_connected(&self, _client_id: &str) -> bool {
        false
    }

    fn link_stats(&self) -> Option<serde_json::Value> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.ingest.stats;
        Some(serde_json::json!({
            "sessions": s.sessions.load(Relaxed),
            "resumed": s.resumed.load(Relaxed),
            "received": s.received.load(Relaxed),
            "acked": s.acked.load(Relaxed),
            "staleAcks": s.stale_acks.load(Relaxed),
            "blocked": s.blocked.load(Relaxed),
            "adopted": s.adopted.load(Relaxed),
            "unsentAcks": s.unsent_acks.load(Relaxed),
            "retiredUnsubscribed": s.retired.load(Relaxed),
        }))
    }
}

/// Files a TLS listener reads (rmqtt takes paths only, and reads them once, when the
/// listener is made).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The broker's TLS: both listeners show the server certificate `identity` holds, written to
/// `files`, and are bound anew each time it is renewed.
pub struct BrokerTls {
    pub files: TlsFiles,
    pub identity: crate::rotation::Identity,
}

/// Listener ids: devices connect to the first, the server's own clients to the second. The
/// listeners bound for a renewed certificate take the next pair: odd ids are device
/// listeners, even ones internal (rmqtt never reuses an id).
const DEVICE_LISTENER: u16 = 1;
const INTERNAL_LISTENER: u16 = 2;

/// Where the broker listens.
#[derive(Debug, Clone, Copy)]
pub struct BrokerAddrs {
    /// Devices (`--mqtt-addr`).
    pub devices: SocketAddr,
    /// The server's service clients (the downlink): loopback only, with a deep queue and a
    /// wide in-flight window.
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
    admission: front_door::Admission,
    tls: BrokerTls,
    deps: BrokerDeps,
) -> anyhow::Result<(Arc<Embedded>, BrokerAddrs)> {
    let arrivals = Arc::new(front_door::Arrivals::default());
    let scx = ServerContext::new().build().await;
    *scx.extends.shared_subscription_mut().await = Box::new(RoundRobinShared::default());
    *scx.extends.retain_mut().await = Box::new(PersistentRetain {
        memory: rmqtt::retain::DefaultRetainStorage::default(),
        store: deps.store.clone(),
    });
    let register = scx.extends.hook_mgr().register();
    let hooks = Arc::new(Hooks {
        scx: scx.clone(),
        gate: deps.gate,
        writer: deps.writer,
        limiter: DeviceLimiter::new(deps.limits),
        store: deps.store,
        events: deps.events,
        arrivals: arrivals.clone(),
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

    let (devices, devices_addr) = device_listener(&tls.files, admission.deadline)?;
    let public = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding MQTT listener on {addr}"))?;
    let (internal, internal_addr) =
        internal_listener(&tls.files, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addrs = BrokerAddrs {
        devices: public.local_addr()?,
        internal: internal_addr,
    };
    let port = Arc::new(front_door::BrokerPort::new(devices_addr.port()));
    front_door::spawn(public, port.clone(), admission, arrivals);
    // Explicit listener ids: the ports may be ephemeral, and rmqtt keys listeners by id.
    // Each listener runs in a server of its own, so the internal one can be stopped alone.
    let devices = run(MqttServer::new(scx.clone())
        .listener_by_id(devices, DEVICE_LISTENER)
        .build());
    let internal = run(MqttServer::new(scx.clone())
        .listener_by_id(internal, INTERNAL_LISTENER)
        .build());
    let renewal = Renewal {
        scx: scx.clone(),
        handshake: admission.deadline,
        device_port: port,
        devices,
        internal_addr,
        internal: Some(internal),
        next_device_id: DEVICE_LISTENER + 2,
        next_internal_id: INTERNAL_LISTENER + 2,
    };
    renewal.spawn(tls);
    Ok((Arc::new(Embedded { scx }), addrs))
}

fn run(server: MqttServer) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = server.run().await {
            tracing::error!(error = %e, "MQTT broker stopped");
        }
    })
}

fn tls_listener(name: &str, laddr: SocketAddr, files: &TlsFiles) -> Builder {
    let path = |p: &Path| p.to_string_lossy().to_string();
    Builder::new()
        .name(name)
        .laddr(laddr)
        .allow_anonymous(false)
        .reuseaddr(Some(true))
        // Nagle plus delayed ACKs would add ~40 ms to every CONNECT/CONNACK exchange.
        .nodelay(true)
        .tls_cross_certificate(true)
        .tls_client_ca_certs(Some(path(&files.ca)))
        .tls_cert(Some(path(&files.cert)))
        .tls_key(Some(path(&files.key)))
        .collect_cert_info(true)
}

/// The listener devices reach through the front door, which tells it their address, ready
/// for TLS with `files`. A port of its own, not 0: rmqtt keys its CONNECT executors by the
/// configured port, and the internal listener's is 0, so devices would queue with the
/// server's own clients.
fn device_listener(
    files: &TlsFiles,
    handshake: std::time::Duration,
) -> anyhow::Result<(RmqttListener, SocketAddr)> {
    let loopback = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|probe| probe.local_addr())
        .context("choosing a loopback port for the broker's device listener")?;
    let l = tls_listener("mqtt/devices", loopback, files)
        .proxy_protocol(true)
        .proxy_protocol_timeout(std::time::Duration::from_secs(1))
        .handshake_timeout(handshake)
        .max_packet_size(MAX_PACKET)
        .max_handshaking_limit(4096)
        .bind()
        .context("binding the broker's device listener")?;
    let local = l.local_addr()?;
    Ok((l.tls().context("configuring MQTT TLS")?, local))
}

/// The loopback listener for the server's own clients (the downlink), with a deep queue and a
/// wide in-flight window, ready for TLS with `files`.
fn internal_listener(
    files: &TlsFiles,
    addr: SocketAddr,
) -> anyhow::Result<(RmqttListener, SocketAddr)> {
    let l = tls_listener("mqtt/internal", addr, files)
        .max_packet_size(64 * 1024)
        .max_inflight(std::num::NonZeroU16::new(4096).unwrap_or(std::num::NonZeroU16::MIN))
        .max_mqueue_len(1_000_000)
        .bind()
        .context("binding internal MQTT listener")?;
    let local = l.local_addr()?;
    Ok((l.tls().context("configuring internal MQTT TLS")?, local))
}

/// rmqtt reads a listener's certificate once, so each renewed server certificate is taken up
/// by binding new listeners with it (its files rewritten first). Sessions on the old ones go on
/// (a certificate is checked at the handshake only).
/// - Devices: a new loopback listener; the front door sends new connections there, and the
///   old one is stopped once a handshake's time has passed.
/// - The server's own clients hold the internal port: its listener is stopped and bound again
///   on the same port (a client connecting in between is refused and retries).
///
/// A step that fails is tried again every [`RENEWAL_RETRY`] until it is taken up: the old
/// certificate has a third of its life left.
struct Renewal {
    scx: ServerContext,
    handshake: std::time::Duration,
    device_port: Arc<front_door::BrokerPort>,
    devices: tokio::task::JoinHandle<()>,
    internal_addr: SocketAddr,
    /// `None` while it is not bound (stopped for a rebind that then failed).
    internal: Option<tokio::task::JoinHandle<()>>,
    /// The next listener ids: odd for devices, even for internal (rmqtt never forgets one and
    /// panics on one used before).
    next_device_id: u16,
    next_internal_id: u16,
}

const RENEWAL_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

impl Renewal {
    fn spawn(mut self, tls: BrokerTls) {
        let BrokerTls {
            files,
            mut identity,
        } = tls;
        tokio::spawn(async move {
            // What each listener shows: the certificate it was bound with.
            let first = identity.borrow_and_update().clone();
            let mut in_use = (first.clone(), first);
            let mut behind = false;
            loop {
                if behind {
                    tokio::select! {
                        changed = identity.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep(RENEWAL_RETRY) => {}
                    }
                } else if identity.changed().await.is_err() {
                    return;
                }
                let cert = identity.borrow_and_update().clone();
                behind = !self.take_up(&files, &cert, &mut in_use).await;
            }
        });
    }

    /// Brings both listeners onto `cert`; whether both are.
    async fn take_up(
        &mut self,
        files: &TlsFiles,
        cert: &Arc<flotilla_pki::KeyedCertificate>,
        in_use: &mut (
            Arc<flotilla_pki::KeyedCertificate>,
            Arc<flotilla_pki::KeyedCertificate>,
        ),
    ) -> bool {
        let fail = |what: &str, e: anyhow::Error| {
            tracing::error!(error = %format!("{e:#}"), "MQTT {what}: renewed server certificate not taken up yet; retrying");
            false
        };
        if let Err(e) = crate::rotation::write_files(cert, &files.cert, &files.key) {
            return fail("listeners", e);
        }
        let mut done = true;
        if !Arc::ptr_eq(&in_use.0, cert) {
            match self.renew_devices(files) {
                Ok(()) => in_use.0 = cert.clone(),
                Err(e) => done = fail("device listener", e),
            }
        }
        if !Arc::ptr_eq(&in_use.1, cert) || self.internal.is_none() {
            match self.renew_internal(files).await {
                Ok(()) => in_use.1 = cert.clone(),
                Err(e) => done = fail("internal listener", e),
            }
        }
        done
    }

    fn take_id(next: &mut u16) -> anyhow::Result<u16> {
        let id = *next;
        *next = id
            .checked_add(2)
            .ok_or_else(|| anyhow::anyhow!("no listener ids left: restart the server"))?;
        Ok(id)
    }

    fn renew_devices(&mut self, files: &TlsFiles) -> anyhow::Result<()> {
        let (listener, local) = device_listener(files, self.handshake)?;
        let lid = Self::take_id(&mut self.next_device_id)?;
        let renewed = run(MqttServer::new(self.scx.clone())
            .listener_by_id(listener, lid)
            .build());
        self.device_port.set(local.port());
        // The front door no longer sends connections to the old one; those it sent a moment
        // ago get a handshake's time to arrive.
        let old = std::mem::replace(&mut self.devices, renewed);
        let grace = self.handshake + std::time::Duration::from_secs(1);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            old.abort();
        });
        tracing::info!(listener = lid, %local, "MQTT device listener: renewed server certificate in use");
        Ok(())
    }

    async fn renew_internal(&mut self, files: &TlsFiles) -> anyhow::Result<()> {
        // Stopping the server task drops its listener (connections run in tasks of their own),
        // which frees the port for the new one.
        if let Some(old) = self.internal.take() {
            old.abort();
            let _ = old.await;
        }
        let (listener, _) = internal_listener(files, self.internal_addr)?;
        let lid = Self::take_id(&mut self.next_internal_id)?;
        self.internal = Some(run(MqttServer::new(self.scx.clone())
            .listener_by_id(listener, lid)
            .build()));
        tracing::info!(listener = lid, addr = %self.internal_addr, "MQTT internal listener: renewed server certificate in use");
        Ok(())
    }
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
    Disconnected { device_id: DeviceId, reason: String },
    /// A device subscribed to one of its downward channels: its session (re)started, so what
    /// waits for it on that channel must be sent now.
    Subscribed {
        device_id: DeviceId,
        channel: Channel,
    },
    /// A device connected with the certificate it was issued by renewal: it holds the new
    /// key, so the old certificate can go.
    RenewedCertificateUsed { device_id: DeviceId, serial: String },
}

/// Session attribute keys.
const IDENTITY: &str = "flotilla.identity";
const CLOSE_REASON: &str = "flotilla.close-reason";
/// Set once what waits on a channel was sent in this session, so repeated SUBSCRIBEs do not
/// re-send it.
const FLUSHED: &str = "flotilla.flushed";

/// How long a device's PUBLISH may wait for its commit before the device is disconnected
/// (below the keep-alive devices use, so a stalled database does not look like a dead link).
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

struct Hooks {
    scx: ServerContext,
    gate: Arc<DeviceGate>,
    writer: Writer,
    limiter: DeviceLimiter,
    store: Store,
    events: mpsc::UnboundedSender<BrokerEvent>,
    arrivals: Arc<front_door::Arrivals>,
}

/// Which listener `lid` is: odd ids devices ([`DEVICE_LISTENER`] and its renewals), even ones
/// internal ([`INTERNAL_LISTENER`] and its renewals).
fn listener_of(lid: u16) -> Option<Listener> {
    match lid {
        0 => None,
        l if l % 2 == DEVICE_LISTENER % 2 => Some(Listener::Devices),
        _ => Some(Listener::Internal),
    }
}

/// The identity and gate decision for a CONNECT, with the serial of the renewed certificate
/// it used if that is not current yet.
fn admit(gate: &DeviceGate, info: &ConnectInfo) -> Result<(Identity, Option<String>), String> {
    let cert = info.cert();
    let cn = cert.and_then(|c| c.common_name.as_deref());
    let listener = listener_of(info.id().lid()).ok_or("unknown listener")?;
    let will_topic = info.last_will().map(|lw| match lw {
        LastWill::V3(w) => w.topic.clone(),
        LastWill::V5(w) => w.topic.clone(),
    });
    let who = acl::authenticate(cn, info.client_id(), listener, will_topic.as_deref())
        .map_err(|e| e.to_string())?;
    if let Some(lw) = info.last_will() {
        check_will(&lw)?;
    }
    let mut renewed = None;
    if let Identity::Device(id) = &who {
        let serial = cert.and_then(|c| c.serial.as_deref());
        let admitted = gate.check(id.as_str(), serial).map_err(|r| {
            match r {
                gate::Refusal::UnknownDevice => "unknown device",
                gate::Refusal::Blocked => "device is blocked",
                gate::Refusal::RevokedCertificate => "certificate revoked",
            }
            .to_string()
        })?;
        if let gate::Admitted::Pending(serial) = admitted {
            renewed = Some(serial);
        }
    }
    Ok((who, renewed))
}

/// A device's will may only say it went offline, at once: a delayed will could land after the
/// server marked the device offline, and an "online" will would forge presence.
fn check_will(lw: &LastWill<'_>) -> Result<(), String> {
    let (payload, delay) = match lw {
        LastWill::V3(w) => (&w.message, None),
        LastWill::V5(w) => (&w.message, w.will_delay_interval_sec),
    };
    if delay.is_some_and(|d| d > 0) {
        return Err("a delayed will is not accepted".into());
    }
    match flotilla_proto::decode::<flotilla_proto::Status>(payload) {
        Ok(status) if !status.online => Ok(()),
        Ok(_) => Err("a will must report the device offline".into()),
        Err(e) => Err(format!("will payload: {e}")),
    }
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
        if let Identity::Device(device) = &who {
            // Charged before any other check, so refused traffic is limited too.
            match self
                .limiter
                .charge(device.as_str(), publish.payload.len(), Instant::now())
            {
                Ok(()) => {}
                Err(Exceeded::Rate) => return self.throttle(session, device.as_str()).await,
                Err(Exceeded::Size) => {
                    tracing::warn!(device = %device, bytes = publish.payload.len(), "publish refused: payload too large");
                    return refused(
                        PublishAckReason::PayloadFormatInvalid,
                        Exceeded::Size.reason(),
                        false,
                    );
                }
            }
        }
        if !acl::may_publish(&who, &publish.topic, publish.retain) {
            tracing::warn!(client_id = %session.id.client_id, topic = %truncate(&publish.topic, 120), retain = publish.retain, "publish refused");
            return PublishAclResult::rejected(false, None);
        }
        let Identity::Device(device) = who else {
            return PublishAclResult::allow();
        };
        let msg = Inbound::new(publish.topic.to_string(), publish.payload.clone());
        if publish.qos == QoS::AtMostOnce {
            if !self.writer.submit_lossy(msg) {
                tracing::warn!(device = %device, "QoS 0 message dropped: ingest queue full");
            }
            return PublishAclResult::allow();
        }
        // The device's PUBACK waits for this: rmqtt acknowledges only after the hook returns.
        match tokio::time::timeout(STORE_TIMEOUT, self.writer.store(msg)).await {
            Ok(Ok(())) => PublishAclResult::allow(),
            Ok(Err(e)) => refused(
                PublishAckReason::ImplementationSpecificError,
                &e.to_string(),
                true,
            ),
            // Not acknowledged: the device sends it again after reconnecting, and a late
            // commit of this copy is deduplicated by (device, seq).
            Err(_) => refused(
                PublishAckReason::ImplementationSpecificError,
                "storage is slow; try again",
                true,
            ),
        }
    }

    /// Disconnects a device that spent its budget, with a reason presence and the audit log
    /// show; it is then refused at CONNECT for [`limits::PENALTY`].
    async fn throttle(&self, session: &Session, device: &str) -> PublishAclResult {
        let reason = Exceeded::Rate.reason();
        session
            .extra_attrs
            .write()
            .await
            .insert(CLOSE_REASON.into(), reason.to_string());
        tracing::warn!(device, reason, "device disconnected");
        // One audit row per penalty at most: the device cannot come back before it ends.
        let (store, device) = (self.store.clone(), device.to_string());
        tokio::spawn(async move {
            store
                .audit(AuditRecord {
                    actor: "broker",
                    action: "device.disconnect",
                    target: Some(&device),
                    result: "throttled",
                    detail: Some(reason.to_string()),
                })
                .await;
        });
        refused(PublishAckReason::QuotaExceeded, reason, true)
    }
}

impl Hooks {
    /// Tells the server a device's session started on `channel`, once per session and channel.
    async fn session_started(&self, session: &Session, device_id: &DeviceId, channel: Channel) {
        if !matches!(channel, Channel::Command | Channel::Ota | Channel::Config) {
            return;
        }
        let first = {
            let mut attrs = session.extra_attrs.write().await;
            let flushed = attrs.get_default_mut(FLUSHED.into(), Vec::<Channel>::new);
            match flushed {
                Some(f) if !f.contains(&channel) => {
                    f.push(channel);
                    true
                }
                _ => false,
            }
        };
        if first {
            let _ = self.events.send(BrokerEvent::Subscribed {
                device_id: device_id.clone(),
                channel,
            });
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
                let admitted = admit(&self.gate, info).and_then(|(who, _)| match who {
                    Identity::Device(id)
                        if !self.limiter.may_connect(id.as_str(), Instant::now()) =>
                    {
                        Err("publish rate limit exceeded: refused for a while".into())
                    }
                    _ => Ok(()),
                });
                let result = match admitted {
                    Ok(()) => AuthResult::Allow(false, None),
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
                let admitted = match session.connect_info().await {
                    Ok(info) => admit(&self.gate, &info),
                    Err(e) => Err(e.to_string()),
                };
                match admitted {
                    Ok((who, renewed)) => {
                        let device = match &who {
                            Identity::Device(id) => Some(id.clone()),
                            Identity::Service(_) => None,
                        };
                        if let (Some(device_id), Some(serial)) = (&device, renewed) {
                            let _ = self.events.send(BrokerEvent::RenewedCertificateUsed {
                                device_id: device_id.clone(),
                                serial,
                            });
                        }
                        if listener_of(session.id.lid) == Some(Listener::Devices)
                            && let Some(addr) = session.id.remote_addr
                        {
                            // The front door stops counting it as arriving.
                            self.arrivals.arrived(addr);
                        }
                        session
                            .extra_attrs
                            .write()
                            .await
                            .insert(IDENTITY.into(), who);
                        // A resumed session keeps its subscriptions without a SUBSCRIBE, so
                        // what waits for it is sent now.
                        if let Some(device_id) = device
                            && session.session_present().await.unwrap_or(false)
                        {
                            for channel in [Channel::Command, Channel::Ota, Channel::Config] {
                                self.session_started(session, &device_id, channel).await;
                            }
                        }
                    }
                    Err(why) => {
                        // Refused since it authenticated (blocked in between): no identity,
                        // no session.
                        tracing::warn!(why, "closing a session without identity");
                        let entry = self.scx.extends.shared().await.entry(session.id.clone());
                        if let Some(tx) = entry.tx() {
                            let _ = tx.unbounded_send(rmqtt::types::Message::Closed(
                                rmqtt::types::Reason::from_static("no identity"),
                            ));
                        }
                    }
                }
                (true, acc)
            }
            Parameter::ClientSubscribeCheckAcl(session, sub) => {
                let who = identity(session).await;
                let within_budget = match &who {
                    Some(Identity::Device(id)) => {
                        self.limiter.charge(id.as_str(), 0, Instant::now()).is_ok()
                    }
                    _ => true,
                };
                let ok = within_budget
                    && who.is_some_and(|who| {
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
                    self.session_started(session, &id, channel).await;
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
                // Wills skip the publish ACL; authentication admitted only an immediate
                // "offline" on the device's own status topic. When the server closed the
                // session itself, its own reason is what presence shows, not the will's.
                let attrs = session.extra_attrs.read().await;
                if let Some(Identity::Device(_)) = attrs.get::<Identity>(IDENTITY)
                    && attrs.get::<String>(CLOSE_REASON).is_none()
                {
                    let _ = self.writer.submit(Inbound::new(
                        publish.topic.to_string(),
                        publish.payload.clone(),
                    ));
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
                        device_id: id.clone(),
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

/// Retained messages: in memory for delivery, and desired config (the only retained message
/// the server publishes) also in the database, so it survives a restart; the server publishes
/// it again at start-up. rmqtt's default store refuses retained messages
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
        // Only desired config is retained by the server (the ACL allows no other downward
        // retained message); it is what must survive a restart.
        if Topic::parse(topic).is_ok_and(|(_, c)| c == Channel::Config) {
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
