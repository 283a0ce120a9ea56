//! Downlink: the server's own MQTT client for what it sends devices (commands, OTA offers,
//! desired config), on a connection of its own so nothing a device sends can hold it up.
//!
//! Handle/runner split: one task owns the event loop; [`Downlink::publish`] only queues, and
//! fails at once when the queue is full or the broker is unreachable, so an HTTP handler never
//! waits on the broker. Callers keep what they publish in the database and send it again when
//! the device's session starts, so a refused publish is delayed, not lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::watch;

use crate::service_link::ServiceLink;

/// Publishes waiting for the connection at most; more are refused.
const QUEUE: usize = 4096;

/// Why a publish was not queued.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error("not connected to the broker")]
    NotConnected,
    #[error("downlink queue full")]
    Busy,
}

#[derive(Clone)]
pub struct Downlink {
    client: AsyncClient,
    connected: Arc<AtomicBool>,
}

impl std::fmt::Debug for Downlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downlink")
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish()
    }
}

impl Downlink {
    /// Connects and starts the runner. The receiver turns true on each confirmed connection.
    pub fn start(link: &ServiceLink, client_id: &str) -> (Downlink, watch::Receiver<bool>) {
        let mut link = link.clone();
        let (client, eventloop) = AsyncClient::new(link.options(client_id), QUEUE);
        let connected = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = watch::channel(false);
        tokio::spawn(run(eventloop, link, connected.clone(), ready_tx));
        (Downlink { client, connected }, ready)
    }

    /// Queues a QoS 1 publish without waiting.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), DownlinkError> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err(DownlinkError::NotConnected);
        }
        self.client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .map_err(|_| DownlinkError::Busy)
    }
}

async fn run(
    mut eventloop: EventLoop,
    mut link: ServiceLink,
    connected: Arc<AtomicBool>,
    ready: watch::Sender<bool>,
) {
    loop {
        if link.refresh(&mut eventloop.options) {
            tracing::info!("downlink: renewed service certificate ready for the next connection");
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected.store(true, Ordering::Relaxed);
                let _ = ready.send(true);
                tracing::info!("downlink connected to broker");
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, Ordering::Relaxed);
                let _ = ready.send(false);
                tracing::warn!(error = %e, "downlink connection error; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
