//! Start-up: storage, PKI, broker, ingest, background jobs and both HTTP listeners, in the
//! order each depends on the last.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flotilla_pki::CertificateAuthority;
use serde::Serialize;

use crate::app::{AppState, app};
use crate::auth::JwtKeys;
use crate::broker::gate::DeviceGate;
use crate::broker::{self, BrokerControl, BrokerDeps, BrokerEvent, BrokerTls, TlsFiles};
use crate::commands::{Dispatcher, spawn_sweepers};
use crate::config::ServerConfig;
use crate::device_listener;
use crate::downlink::Downlink;
use crate::ingest::link::IngestLink;
use crate::ingest::writer::{IngestEvent, Writer};
use crate::login_limits::{AnonymousLimiter, LoginLimiter};
use crate::ota::OtaService;
use crate::passwords::Passwords;
use crate::service_link::ServiceLink;
use flotilla_store::Store;

/// Where the running server listens, written to `DATA_DIR/endpoints.json` once all are bound
/// (ports may be 0 in the configuration).
#[derive(Debug, Clone, Serialize)]
pub struct Endpoints {
    pub http: SocketAddr,
    pub device: SocketAddr,
    pub mqtt: SocketAddr,
    /// The loopback listener for the server's own service clients.
    pub mqtt_internal: SocketAddr,
}

pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let data = config.data_dir.clone();
    std::fs::create_dir_all(&data)
        .with_context(|| format!("creating data dir {}", data.display()))?;
    let database = config.database()?;
    let store = Store::open(&database).await?;
    tracing::info!(database = %database.redacted(), "database open");
    let ca = Arc::new(CertificateAuthority::load_or_create(&data)?);
    // The server's TLS certificate, renewed while it runs; in server.pem and server.key too,
    // for what reads files (the embedded broker, a Mosquitto in tests).
    let server_identity = {
        let (ca, hosts) = (ca.clone(), config.certificate_hosts());
        let validity = config.server_cert_validity();
        crate::rotation::keep_fresh("server certificate", validity, move || {
            Ok(ca.issue_server_certificate_valid_for(&hosts, validity)?)
        })?
    };
    let (cert_path, key_path) = (data.join("server.pem"), data.join("server.key"));
    crate::rotation::write_files(&server_identity.borrow(), &cert_path, &key_path)?;
    let jwt = Arc::new(
        JwtKeys::open(
            &data,
            store.clone(),
            std::time::Duration::from_secs(config.jwt_ttl_secs),
        )
        .await?,
    );

    let gate = Arc::new(DeviceGate::load(store.gate_snapshot().await?));
    // Replicas share a PostgreSQL database; a SQLite file belongs to one process.
    let replicated = matches!(database, flotilla_store::DatabaseUrl::Postgres(_));
    if replicated {
        spawn_gate_refresh(store.clone(), gate.clone());
    }
    let tls = BrokerTls {
        files: TlsFiles {
            ca: data.join(flotilla_pki::CA_CERT_FILE),
            cert: cert_path.clone(),
            key: key_path.clone(),
        },
        identity: server_identity.clone(),
    };
    let (ingest_events, ingested) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let writer = Writer::spawn(
        store.clone(),
        config.ingest_batch,
        ingest_events,
        metrics.ingest.clone(),
    );
    let writer_handle = writer.clone();
    let (broker_events, broker_said) = tokio::sync::mpsc::unbounded_channel();
    // Each service client's certificate, renewed while the server runs.
    let service_identity = |service: String| {
        let (ca, validity) = (ca.clone(), config.service_cert_validity());
        crate::rotation::keep_fresh("service certificate", validity, move || {
            Ok(ca.issue_service_certificate_valid_for(&service, validity)?)
        })
    };
    let mut broker = match config.external_broker()? {
        None => {
            let identity = service_identity("server".into())?;
            let (embedded, addrs) = broker::start(
                config.mqtt_addr,
                config.mqtt_admission(),
                tls,
                BrokerDeps {
                    gate: gate.clone(),
                    writer,
                    limits: config.publish_limits(),
                    store: store.clone(),
                    events: broker_events,
                },
            )
            .await?;
            BrokerSide {
                control: embedded,
                reports_sessions: true,
                devices: addrs.devices,
                service: addrs.internal,
                link: ServiceLink {
                    host: connect_host(addrs.internal),
                    port: addrs.internal.port(),
                    ca_pem: ca.certificate_pem().to_string(),
                    identity,
                },
                downlink_id: format!(
                    "{}server-downlink-{}",
                    flotilla_pki::SERVICE_PREFIX,
                    hex::encode(rand::random::<[u8; 4]>())
                ),
                replica_id: None,
            }
        }
        Some(url) => {
            if config.demo > 0 {
                anyhow::bail!(
                    "--demo runs its devices on the embedded broker; drop --broker-url or --demo"
                );
            }
            // No broker events come in this mode: presence comes from the devices' status
            // messages and wills.
            drop(broker_events);
            let ca_pem = match &config.broker_ca {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading --broker-ca {}", path.display()))?,
                None => ca.certificate_pem().to_string(),
            };
            // Each service client shows a certificate whose CN is its client id, so a broker
            // that takes the client id from the certificate (use_username_as_clientid) lets
            // nobody else take over its session.
            let link_as = |service: &str| -> anyhow::Result<(ServiceLink, String)> {
                let link = ServiceLink {
                    host: url.host.clone(),
                    port: url.port,
                    ca_pem: ca_pem.clone(),
                    identity: service_identity(service.to_string())?,
                };
                Ok((link, format!("{}{service}", flotilla_pki::SERVICE_PREFIX)))
            };
            let addr = tokio::net::lookup_host((url.host.as_str(), url.port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| format!("resolving the broker host {}", url.host))?;
            let share_group = ingest_share_group(&ca);
            let (ingest_link, ingest_id) = link_as(&crate::ingest::handover::session_service(
                &config.replica_id,
            ))?;
            // One server per replica id: a second would share its ingest session.
            let replica_id = if replicated {
                Some(crate::replica_id::claim(&store, &config.replica_id).await?)
            } else {
                None
            };
            // With replicas, the ingest session is this replica's to use while it holds its
            // lease, and a peer's that lapsed is drained by whoever takes its lease.
            let claim = if replicated {
                crate::ingest::handover::claim_own(store.clone(), config.replica_id.clone())
            } else {
                crate::ingest::link::always()
            };
            let own_claim = claim.clone();
            let adopter_link = ingest_link.clone();
            let mut ingest = IngestLink::start(
                ingest_link,
                &ingest_id,
                (ingest_filters(&share_group), retired_ingest_filters()),
                writer.clone(),
                gate.clone(),
                claim,
            );
            if replicated {
                crate::ingest::handover::Adopter {
                    own: own_claim.clone(),
                    link: ingest.clone(),
                    store: store.clone(),
                    ca: ca.clone(),
                    broker: adopter_link,
                    replica: config.replica_id.clone(),
                    // A dead peer of an earlier version may hold the retired ones.
                    filters: [ingest_filters(&share_group), retired_ingest_filters()].concat(),
                    writer,
                    gate: gate.clone(),
                    stats: ingest.stats.clone(),
                }
                .spawn();
            }
            // A peer may be draining this replica's session: however long that takes, the
            // link connects once it is over.
            let mut own = own_claim;
            if !*own.borrow() {
                tracing::info!("waiting for this replica's ingest lease before connecting");
            }
            own.wait_for(|held| *held)
                .await
                .context("the ingest lease holder stopped")?;
            tokio::time::timeout(std::time::Duration::from_secs(30), ingest.subscribed())
                .await
                .context("ingest did not subscribe on the external broker within 30 s")?
                .map_err(|why| anyhow::anyhow!("the external broker refused ingest: {why}"))?;
            tracing::warn!(broker = %addr, "external broker: blocking and revocation do not disconnect devices there, and presence comes from device messages only");
            let (link, downlink_id) = link_as(&format!("server-downlink-{}", config.replica_id))?;
            BrokerSide {
                control: Arc::new(broker::External { ingest }),
                reports_sessions: false,
                devices: addr,
                service: addr,
                link,
                downlink_id,
                replica_id,
            }
        }
    };
    let mqtt = broker.devices;

    let dispatcher = Arc::new(Dispatcher::new(store.clone()));
    let link = broker.link.clone();
    let client_id = broker.downlink_id.clone();
    let keys = crate::ota::TrustedKeys::load(&config.release_keys)?;
    if keys.is_empty() {
        tracing::warn!("no --release-key configured: releases cannot be published");
    }
    let artifacts = match &config.s3_bucket {
        None => crate::ota::Artifacts::local(&config.artifacts_path())
            .with_context(|| format!("artifact store {}", config.artifacts_path().display()))?,
        Some(bucket) => crate::ota::Artifacts::s3(
            &config.artifacts_path(),
            &crate::ota::artifacts::S3Settings {
                bucket: bucket.clone(),
                endpoint: config.s3_endpoint.clone(),
                region: config.s3_region.clone(),
            },
        )
        .context("S3 artifact store")?,
    };
    let ota = crate::ota::OtaService::new(store.clone(), keys, artifacts);
    let (downlink, mut downlink_ready) = Downlink::start(&link, &client_id);
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        downlink_ready.wait_for(|up| *up),
    )
    .await
    .context("downlink did not connect to the broker within 30 s")?
    .context("downlink stopped")?;
    republish_retained(&store, &downlink).await?;
    dispatcher.attach(downlink.clone());
    spawn_presence(
        store.clone(),
        gate.clone(),
        broker.control.clone(),
        dispatcher.clone(),
        ota.clone(),
        broker_said,
    );
    spawn_ingest_consumer(
        store.clone(),
        ota.clone(),
        dispatcher.clone(),
        !broker.reports_sessions,
        ingested,
    );
    let leadership = if replicated {
        let holder = format!(
            "{}:{}",
            config.replica_id,
            hex::encode(rand::random::<[u8; 8]>())
        );
        crate::leader::Leadership::compete(store.clone(), holder)
    } else {
        crate::leader::Leadership::alone()
    };
    ota.attach(
        downlink,
        crate::rollouts::spawn(store.clone(), ota.clone(), leadership.clone()),
    );
    spawn_sweepers(
        store.clone(),
        config.heartbeat_timeout(),
        leadership.clone(),
    );
    crate::commands::spawn_resender(dispatcher.clone(), leadership.clone());
    crate::retention::spawn(
        store.clone(),
        ca.clone(),
        config.retention.clone(),
        leadership.clone(),
    );

    let shared_limits =
        replicated.then(|| crate::shared_limits::SharedLimits::start(store.clone()));
    let command_waits = crate::command_waits::CommandWaits::start(&store).await?;
    let releasing = (store.clone(), leadership.clone(), broker.replica_id.take());
    let state = AppState {
        store,
        jwt,
        limiter: Arc::new(LoginLimiter::default()),
        shared_limits,
        leadership,
        passwords: Passwords::default(),
        anonymous: Arc::new(AnonymousLimiter::default()),
        registrations: Arc::new(AnonymousLimiter::default()),
        ca: ca.clone(),
        gate,
        broker: broker.control.clone(),
        dispatcher,
        ota,
        config: config.clone(),
        metrics,
        writer: writer_handle,
        command_waits,
    };
    let acceptor = device_listener::tls_acceptor(ca.certificate_pem(), server_identity)?;
    let proxies = crate::proxy_protocol::ProxyPeers::new(&config.proxy_protocol_from);
    let device = device_listener::serve(
        config.device_addr,
        acceptor,
        device_listener::router(state.clone()),
        crate::conn_limits::ConnectionGate::new(
            config.device_listener_max,
            config.device_listener_per_address,
        ),
        proxies.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding HTTP API on {}", config.http_addr))?;
    let http = listener.local_addr()?;

    let endpoints = Endpoints {
        http,
        device,
        mqtt,
        mqtt_internal: broker.service,
    };
    std::fs::write(
        data.join("endpoints.json"),
        serde_json::to_vec_pretty(&endpoints)?,
    )?;
    tracing::info!(%http, %device, %mqtt, data_dir = %data.display(), "flotilla-server ready");
    // Held until the server stops; dropping it stops the fleet.
    let _demo = match config.demo {
        0 => None,
        n => Some(crate::demo::start(&state.store, &data, &endpoints, n).await?),
    };

    crate::listener::spawn(
        listener,
        crate::listener::Transport::Plain,
        app(state),
        crate::conn_limits::ConnectionGate::new(config.http_max, config.http_per_address),
        proxies,
    );
    shutdown_signal().await;
    let (store, leadership, replica_id) = releasing;
    leadership.release(&store).await;
    if let Some(replica_id) = replica_id {
        replica_id.release(&store).await;
    }
    Ok(())
}

/// What the server took from the broker it uses, embedded or external.
struct BrokerSide {
    control: Arc<dyn BrokerControl>,
    /// Whether the broker tells the server when a device's session starts.
    reports_sessions: bool,
    /// Where devices connect.
    devices: SocketAddr,
    /// Where the server's own clients connect.
    service: SocketAddr,
    /// How the downlink reaches the broker, and as whom.
    link: ServiceLink,
    downlink_id: String,
    /// This server's claim to its replica id, with an external broker and replicas.
    replica_id: Option<crate::replica_id::ReplicaId>,
}

/// What the ingest link takes from an external broker: every upward channel of every
/// device, shared among the replicas (each message goes to one of them).
fn ingest_filters(group: &str) -> Vec<String> {
    flotilla_proto::Channel::ALL
        .into_iter()
        .filter(|c| c.direction() == flotilla_proto::Direction::Up)
        .map(|c| format!("$share/{group}/devices/+/{}", c.suffix()))
        .collect()
}

/// The shared-subscription group the replicas' ingest sessions join, the same for every
/// replica of a deployment (they hold one CA key) and unguessable to anyone else.
///
/// It is a secret because Mosquitto's ACL file does not check subscriptions, only deliveries:
/// a device that subscribed `$share/<group>/devices/+/telemetry` with the group's name would
/// be given every other message of the stream, which its ACL then drops, after the publisher
/// had its PUBACK. In a group of its own it only gets copies, and those are dropped.
fn ingest_share_group(ca: &flotilla_pki::CertificateAuthority) -> String {
    let secret = ca.derive_secret("ingest shared-subscription group");
    format!("flotilla-{}", hex::encode(&secret[..16]))
}

/// The filters of the fixed group versions before the secret one used. A persistent session
/// keeps them across an upgrade, and through them it would take a share of every message a
/// second time, in a group a device can join.
fn retired_ingest_filters() -> Vec<String> {
    ingest_filters("flotilla")
}

/// How long a closed connection waits before it counts: messages the device sent just before
/// closing are still in the ingest pipeline, and a device that reconnects at once stays online.
const DISCONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends again, at start-up, the retained messages the server published before it stopped
/// (desired config), so the broker holds them as it did.
async fn republish_retained(store: &Store, downlink: &Downlink) -> anyhow::Result<()> {
    for r in store.retained().await? {
        // The downlink queue is bounded; at start-up waiting for room is right.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while let Err(e) = downlink.publish(&r.topic, r.payload.clone(), true) {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("republishing retained {}: {e}", r.topic);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Acts on what the broker reports: a closed connection marks the device offline unless it
/// came back; a session that starts gets what waits for it.
fn spawn_presence(
    store: Store,
    gate: Arc<DeviceGate>,
    broker: Arc<dyn BrokerControl>,
    dispatcher: Arc<Dispatcher>,
    ota: Arc<OtaService>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<BrokerEvent>,
) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                BrokerEvent::Subscribed { device_id, channel } => {
                    let (dispatcher, ota, store) = (dispatcher.clone(), ota.clone(), store.clone());
                    tokio::spawn(async move {
                        match channel {
                            flotilla_proto::Channel::Command => {
                                dispatcher.flush_pending(&device_id).await
                            }
                            flotilla_proto::Channel::Ota => ota.resend_offers(&device_id).await,
                            flotilla_proto::Channel::Config => {
                                crate::device_config::resend_if_out_of_sync(
                                    &store,
                                    &dispatcher,
                                    &device_id,
                                )
                                .await
                            }
                            _ => {}
                        }
                    });
                }
                BrokerEvent::RenewedCertificateUsed { device_id, serial } => {
                    let (store, gate, broker) = (store.clone(), gate.clone(), broker.clone());
                    tokio::spawn(async move {
                        match crate::renewal::promote(
                            &store,
                            &gate,
                            &device_id,
                            &serial,
                            "connected",
                        )
                        .await
                        {
                            Ok(flotilla_store::Promotion::Unknown) => {
                                // Revoked or replaced between the gate's check and now.
                                let _ = gate.refresh(&store, &device_id).await;
                                broker.kick(device_id.as_str()).await;
                            }
                            Ok(_) => {}
                            // The device confirms over /renew/confirm, or connects again.
                            Err(e) => {
                                tracing::warn!(device_id = %device_id, error = %e, "promoting a renewed certificate failed")
                            }
                        }
                    });
                }
                BrokerEvent::Disconnected { device_id, reason } => {
                    let (store, broker) = (store.clone(), broker.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(DISCONNECT_GRACE).await;
                        if broker.is_connected(device_id.as_str()).await {
                            return;
                        }
                        match store.mark_offline(&device_id, &reason).await {
                            Ok(true) => {
                                tracing::info!(device_id = %device_id, reason = %reason, "device offline: disconnected")
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, device_id = %device_id, "recording disconnect failed")
                            }
                        }
                    });
                }
            }
        }
    });
}

/// Tells OTA and the rollouts what committed device messages changed. With
/// `resend_on_online` (a broker that does not report sessions) a device coming online also
/// gets what waits for it.
fn spawn_ingest_consumer(
    store: Store,
    ota: Arc<OtaService>,
    dispatcher: Arc<Dispatcher>,
    resend_on_online: bool,
    mut events: tokio::sync::mpsc::UnboundedReceiver<IngestEvent>,
) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                IngestEvent::CameOnline(device) => {
                    ota.device_online(&device);
                    if resend_on_online {
                        let (dispatcher, ota, store) =
                            (dispatcher.clone(), ota.clone(), store.clone());
                        tokio::spawn(async move {
                            dispatcher.flush_pending(&device).await;
                            ota.resend_offers(&device).await;
                            crate::device_config::resend_if_out_of_sync(
                                &store,
                                &dispatcher,
                                &device,
                            )
                            .await;
                        });
                    }
                }
                IngestEvent::Finished(f) => ota.finished(f).await,
            }
        }
    });
}

/// Loopback name for a wildcard bind, so the certificate's `localhost` matches.
fn connect_host(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() || addr.ip().is_loopback() {
        "localhost".into()
    } else {
        addr.ip().to_string()
    }
}

/// Replicas share the database but each has its own gate: every few seconds each takes what
/// the others changed (a block or revocation on one replica reaches the firmware downloads,
/// the broker and the ingest of all of them within that time).
fn spawn_gate_refresh(store: Store, gate: Arc<DeviceGate>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tick.tick().await;
            match store.gate_snapshot().await {
                Ok(rows) => gate.replace(rows),
                Err(e) => tracing::warn!(error = %e, "refreshing the device gate failed"),
            }
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

/// `flotilla-server admin create`: an admin account, written offline to the data dir.
pub async fn create_admin(
    data_dir: &Path,
    database: &flotilla_store::DatabaseUrl,
    email: &str,
    password: &str,
    username: &str,
) -> anyhow::Result<i64> {
    crate::routes::auth::validate_credentials(username, email, password)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    std::fs::create_dir_all(data_dir)?;
    let store = Store::open(database).await?;
    let hash = crate::passwords::hash_password(password)?;
    let id = store
        .create_user(
            username,
            &email.trim().to_lowercase(),
            &hash,
            flotilla_store::Role::Admin,
        )
        .await
        .context("creating admin (is the email taken?)")?;
    store
        .audit(flotilla_store::AuditRecord {
            actor: "cli:admin-create",
            action: "admin.user.create",
            target: Some(email),
            result: "success",
            detail: None,
        })
        .await;
    Ok(id)
}
