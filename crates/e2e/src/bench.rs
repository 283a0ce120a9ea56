//! Helpers shared by the benchmark binaries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::json;

use crate::{DeviceIdentity, Server, wait_for};

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Enrolls `n` devices named `{prefix}-00000`... through `/sign-csr`, 16 at a time.
pub async fn enroll_all(
    server: &Server,
    jwt: &str,
    prefix: &str,
    n: usize,
) -> Result<Vec<DeviceIdentity>> {
    let ids: Vec<Result<DeviceIdentity>> = futures::stream::iter((0..n).map(|i| {
        let id = format!("{prefix}-{i:05}");
        async move { server.enroll(jwt, &id).await }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    ids.into_iter().collect()
}

/// One connected device: its client, plus a counter of PUBACKs received.
pub struct Conn {
    client: AsyncClient,
    acks: Arc<AtomicU64>,
    /// The task polling the connection; aborting it closes the socket.
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

pub async fn connect_one(port: u16, id: &DeviceIdentity) -> Result<Conn> {
    let mut o = MqttOptions::new(&id.device_id, "localhost", port);
    o.set_keep_alive(Duration::from_secs(120));
    o.set_connection_timeout(60);
    let mut net = o.network_options();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    // rumqttc otherwise sizes its in-flight table for 65,535 publishes: ~10 MB per client.
    o.set_outgoing_inflight_upper_limit(100);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: id.ca_pem.as_bytes().to_vec(),
        alpn: None,
        client_auth: Some((
            id.cert_pem.as_bytes().to_vec(),
            id.key_pem.as_bytes().to_vec(),
        )),
    }));
    let (client, mut eventloop) = AsyncClient::new(o, 128);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                break;
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => anyhow::bail!("refused: {:?}", ack.code),
            Ok(_) => {}
            Err(e) => anyhow::bail!("{}: {e}", id.device_id),
        }
    }
    let acks = Arc::new(AtomicU64::new(0));
    let counter = acks.clone();
    let pump = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(Conn { client, acks, pump })
}

/// Connects every identity with `concurrency` handshakes in flight; returns the connections and
/// the connects per second.
pub async fn connect_all(
    port: u16,
    ids: &[DeviceIdentity],
    concurrency: usize,
) -> Result<(Vec<Conn>, f64)> {
    let started = Instant::now();
    let results: Vec<Result<Conn>> =
        futures::stream::iter(ids.iter().map(|id| connect_one(port, id)))
            .buffered(concurrency) // ordered: conns[i] belongs to ids[i]
            .collect()
            .await;
    let elapsed = started.elapsed().as_secs_f64();
    let conns: Vec<Conn> = results.into_iter().collect::<Result<_>>()?;
    Ok((conns, ids.len() as f64 / elapsed))
}

/// Device i of `conns` (identity `ids[i]`) publishes `per_device` QoS 1 telemetry messages;
/// returns the seconds until every PUBACK arrived.
pub async fn publish_burst_ids(
    conns: &[Conn],
    ids: &[DeviceIdentity],
    per_device: usize,
    seq_base: u64,
) -> Result<f64> {
    let before: Vec<u64> = conns
        .iter()
        .map(|c| c.acks.load(Ordering::Relaxed))
        .collect();
    let started = Instant::now();
    let sends = conns.iter().zip(ids).map(|(c, id)| async move {
        let topic = format!("devices/{}/telemetry", id.device_id);
        for i in 0..per_device {
            let payload =
                json!({ "seq": seq_base + i as u64, "pot": 1841, "switch": true, "temp": 21.5 })
                    .to_string();
            c.client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await?;
        }
        anyhow::Ok(())
    });
    futures::future::try_join_all(sends).await?;
    eprintln!(
        "published {} messages in {:.2}s",
        conns.len() * per_device,
        started.elapsed().as_secs_f64()
    );
    wait_for("every PUBACK", Duration::from_secs(120), || {
        let acked: u64 = conns
            .iter()
            .zip(&before)
            .map(|(c, b)| c.acks.load(Ordering::Relaxed) - b)
            .sum();
        let done = acked >= (conns.len() * per_device) as u64;
        async move { done.then_some(()) }
    })
    .await?;
    Ok(started.elapsed().as_secs_f64())
}
