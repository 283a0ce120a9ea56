//! Ingest: the server's own MQTT client reads every device's upward channels through an MQTT v5
//! shared subscription (so N server replicas split the load, against the embedded broker or an
//! external one alike) and stores them with group commit.
//!
//! Nothing acknowledged is lost: acks are manual and sent only after the batch holding the
//! message has committed. A crash before the commit means the broker redelivers, and the
//! (device, seq) key makes the redelivery harmless.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{
    Channel, CommandReply, DeviceId, Heartbeat, OtaStatus, Status, Telemetry, Topic, decode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

use crate::commands::Dispatcher;
use crate::ota::OtaService;
use crate::store::{DeviceUpdate, Finished, Store, now_ms};

/// Shared-subscription group of all Flotilla server replicas.
pub const GROUP: &str = "flotilla";

/// How the service client reaches the broker and proves who it is.
#[derive(Clone)]
pub struct ServiceLink {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServiceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceLink")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ServiceLink {
    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_manual_acks(true);
        o.set_clean_start(true);
        o.set_max_packet_size(Some(64 * 1024));
        // Without TCP_NODELAY, Nagle and delayed ACKs stall small MQTT packets by ~40 ms.
        let mut net = o.network_options();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        // rumqttc otherwise sizes its in-flight table for 65,535 publishes (~10 MB).
        o.set_outgoing_inflight_upper_limit(256);
        // A wide receive window lets one commit cover hundreds of messages (acks are manual).
        o.set_receive_maximum(Some(4096));
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: self.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: Some((
                self.cert_pem.clone().into_bytes(),
                self.key_pem.clone().into_bytes(),
            )),
        }));
        o
    }
}

/// A decoded upward message.
#[derive(Debug)]
enum Item {
    Update(DeviceId, DeviceUpdate),
    Reply(DeviceId, CommandReply),
    Ota(DeviceId, OtaStatus),
}

/// Why a message was dropped unread.
fn decode_item(topic: &str, payload: &[u8]) -> Result<Item, String> {
    let (device, channel) = Topic::parse(topic).map_err(|e| e.to_string())?;
    let err = |e: flotilla_proto::DecodeError| e.to_string();
    Ok(match channel {
        Channel::Health => Item::Update(
            device,
            DeviceUpdate::Heartbeat(decode::<Heartbeat>(payload).map_err(err)?),
        ),
        Channel::Status => Item::Update(
            device,
            DeviceUpdate::Status(decode::<Status>(payload).map_err(err)?),
        ),
        Channel::Telemetry => {
            let t: Telemetry = decode(payload).map_err(err)?;
            if t.seq > i64::MAX as u64 || t.temp.is_some_and(|v| !v.is_finite()) {
                return Err("telemetry value out of range".into());
            }
            Item::Update(device, DeviceUpdate::Telemetry(t))
        }
        Channel::Reply => {
            let r: CommandReply = decode(payload).map_err(err)?;
            if r.id.len() > 64 {
                return Err("command id too long".into());
            }
            Item::Reply(device, r)
        }
        Channel::OtaStatus => Item::Ota(device, decode::<OtaStatus>(payload).map_err(err)?),
        Channel::Command | Channel::Ota | Channel::Config => return Err("downward channel".into()),
    })
}

/// Starts the ingest client and its writer. Returns the client (the dispatcher publishes with it).
pub fn start(
    link: &ServiceLink,
    client_id: &str,
    store: Store,
    dispatcher: Arc<Dispatcher>,
    ota: Arc<OtaService>,
    batch: usize,
) -> AsyncClient {
    let (client, eventloop) = AsyncClient::new(link.options(client_id), 4096);
    let (tx, rx) = mpsc::channel::<Publish>(batch.max(1) * 8);
    tokio::spawn(read_loop(client.clone(), eventloop, tx));
    tokio::spawn(write_loop(
        client.clone(),
        rx,
        store,
        dispatcher,
        ota,
        batch.max(1),
    ));
    client
}

async fn read_loop(client: AsyncClient, mut eventloop: EventLoop, tx: mpsc::Sender<Publish>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("ingest connected to broker");
                for channel in Channel::ALL
                    .into_iter()
                    .filter(|c| c.direction() == flotilla_proto::Direction::Up)
                {
                    let filter = format!("$share/{GROUP}/{}", channel.all_devices_filter());
                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        tracing::error!(error = %e, "ingest subscribe failed");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "ingest connection error; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn write_loop(
    client: AsyncClient,
    mut rx: mpsc::Receiver<Publish>,
    store: Store,
    dispatcher: Arc<Dispatcher>,
    ota: Arc<OtaService>,
    batch: usize,
) {
    let mut buf = Vec::with_capacity(batch);
    while rx.recv_many(&mut buf, batch).await > 0 {
        let Committed {
            came_online,
            finished,
        } = loop {
            match commit_batch(&store, &buf).await {
                Ok(online) => break online,
                Err(e) => {
                    // Not acknowledged, so not lost: retry until the database is back.
                    tracing::error!(error = %e, "ingest commit failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        for p in buf.drain(..) {
            if let Err(e) = client.ack(&p).await {
                tracing::warn!(error = %e, "ingest ack failed");
            }
        }
        for device in came_online {
            dispatcher.flush_pending(&device).await;
            ota.device_online(&device).await;
        }
        for f in finished {
            ota.finished(f).await;
        }
    }
}

/// What a committed batch changed that others must hear about.
#[derive(Default)]
struct Committed {
    came_online: Vec<String>,
    finished: Vec<Finished>,
}

/// Stores one batch in one transaction.
async fn commit_batch(store: &Store, batch: &[Publish]) -> sqlx::Result<Committed> {
    let now = now_ms();
    let mut tx = store.pool().begin().await?;
    let mut out = Committed::default();
    for p in batch {
        let topic = String::from_utf8_lossy(&p.topic);
        let item = match decode_item(&topic, &p.payload) {
            Ok(item) => item,
            Err(why) => {
                tracing::warn!(topic = %flotilla_proto::truncate_chars(&topic, 120), bytes = p.payload.len(), why, "dropped malformed device message");
                continue;
            }
        };
        match item {
            Item::Update(device, update) => {
                if crate::store::apply_update(&mut tx, device.as_str(), &update, now).await? {
                    out.came_online.push(device.as_str().to_string());
                }
            }
            Item::Reply(device, reply) => {
                Store::apply_reply(&mut tx, device.as_str(), &reply, now).await?;
            }
            Item::Ota(device, status) => {
                tracing::info!(device = %device, status = ?status.status, id = ?status.id, "OTA status");
                if let Some(f) =
                    crate::store::apply_ota_status(&mut tx, device.as_str(), &status, now).await?
                {
                    out.finished.push(f);
                }
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        assert!(decode_item("devices/a/health", b"{").is_err());
        assert!(decode_item("devices/a/health", &vec![b' '; 5000]).is_err());
        assert!(decode_item("devices/a/command", b"{}").is_err());
        assert!(decode_item("devices/a/telemetry", br#"{"seq":18446744073709551615}"#).is_err());
        assert!(
            decode_item(
                "devices/a/reply",
                format!(r#"{{"id":"{}","status":"succeeded"}}"#, "x".repeat(65)).as_bytes()
            )
            .is_err()
        );
        assert!(decode_item("devices/a/health", br#"{"heap":18000,"fw":"1.0.0"}"#).is_ok());
    }
}
