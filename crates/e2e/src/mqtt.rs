//! A small MQTT v5 test client over TLS that reports each packet the broker sends.

use std::time::Duration;

use anyhow::{Result, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;

/// How a connection attempt ended.
#[derive(Debug)]
pub enum Outcome {
    Connected(Session),
    Refused(String),
}

pub struct Session {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    /// Messages that arrived while a call waited for another packet (a command can overtake
    /// the SUBACK of the subscription it was sent for), kept for [`Session::message`].
    early: std::collections::VecDeque<Packet>,
    link: tokio::task::JoinHandle<()>,
}

/// A last will for [`connect_with`].
#[derive(Debug, Clone)]
pub struct WillSpec {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

/// Connects to `localhost:port` with `client_id`, trusting `ca_pem` and presenting
/// `client_auth` (cert, key) if given.
pub async fn connect(
    port: u16,
    ca_pem: &str,
    client_auth: Option<(&str, &str)>,
    client_id: &str,
) -> Outcome {
    connect_with(port, ca_pem, client_auth, client_id, None).await
}

/// Options for `client_id` at `localhost:port` over TLS, trusting `ca_pem` and presenting
/// `client_auth` (cert, key) if given.
fn tls_options(
    port: u16,
    ca_pem: &str,
    client_auth: Option<(&str, &str)>,
    client_id: &str,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "localhost", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca_pem.as_bytes().to_vec(),
        alpn: None,
        client_auth: client_auth.map(|(c, k)| (c.as_bytes().to_vec(), k.as_bytes().to_vec())),
    }));
    o
}

/// [`connect`] with a last will.
pub async fn connect_with(
    port: u16,
    ca_pem: &str,
    client_auth: Option<(&str, &str)>,
    client_id: &str,
    will: Option<WillSpec>,
) -> Outcome {
    let mut o = tls_options(port, ca_pem, client_auth, client_id);
    if let Some(w) = will {
        o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            w.topic,
            w.payload,
            QoS::AtLeastOnce,
            w.retain,
            None,
        ));
    }
    o.set_keep_alive(Duration::from_secs(10));
    o.set_connection_timeout(5);
    let mut net = o.network_options();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    o.set_outgoing_inflight_upper_limit(16);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let link = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(p)) => {
                    if tx.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some(Ok(Packet::ConnAck(ack)))) if ack.code == ConnectReturnCode::Success => {
            Outcome::Connected(Session {
                client,
                events: rx,
                early: Default::default(),
                link,
            })
        }
        Ok(Some(Ok(Packet::ConnAck(ack)))) => Outcome::Refused(format!("{:?}", ack.code)),
        Ok(Some(Ok(other))) => Outcome::Refused(format!("unexpected {other:?}")),
        Ok(Some(Err(e))) => Outcome::Refused(e),
        Ok(None) => Outcome::Refused("closed".into()),
        Err(_) => Outcome::Refused("timeout".into()),
    }
}

/// Leaves a persistent session (clean start off, expiry 1 h) at the broker on `port`,
/// subscribed to `filter` at QoS 1, as a client that then went away: what an earlier server
/// version left behind.
pub async fn leave_persistent_session(
    port: u16,
    ca_pem: &str,
    client_auth: (&str, &str),
    client_id: &str,
    filter: &str,
) -> Result<()> {
    let mut o = tls_options(port, ca_pem, Some(client_auth), client_id);
    o.set_clean_start(false);
    o.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
        session_expiry_interval: Some(3600),
        ..Default::default()
    });
    let (client, mut eventloop) = AsyncClient::new(o, 8);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let run = async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::SubAck(ack)) => {
                    anyhow::ensure!(
                        ack.return_codes == [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                        "{filter} refused: {ack:?}"
                    );
                    client.disconnect().await?;
                }
                Event::Outgoing(rumqttc::Outgoing::Disconnect) => return anyhow::Ok(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run).await?
}

/// Connects as a device with its own identity (client id = its CN); an error if refused.
///
/// "Server unavailable" is retried a few times, as a device does: the embedded broker answers
/// so while it still tears down the previous session of the same client id.
pub async fn connect_device(port: u16, id: &crate::DeviceIdentity) -> Result<Session> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match connect(
            port,
            &id.ca_pem,
            Some((&id.cert_pem, &id.key_pem)),
            &id.device_id,
        )
        .await
        {
            Outcome::Connected(s) => return Ok(s),
            Outcome::Refused(why) if why.contains("ServerUnavailable") && attempts < 5 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Outcome::Refused(why) => bail!("{} refused: {why}", id.device_id),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.link.abort();
    }
}

impl Session {
    /// Drops the TCP connection without a DISCONNECT, as a device losing power does: the
    /// broker then publishes the will.
    pub fn cut(self) {
        drop(self);
    }

    /// A QoS 1 publish with the retain flag set; returns the PUBACK reason.
    pub async fn publish_retained(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PubAckReason> {
        self.publish_with(topic, payload.into(), true).await
    }

    /// Waits for the next packet matching `pick`, skipping others; skipped messages are kept
    /// for a later call.
    async fn next<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T> {
        if let Some(i) = self.early.iter().position(|p| pick(p).is_some())
            && let Some(v) = self.early.remove(i).as_ref().and_then(&mut pick)
        {
            return Ok(v);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(p))) => {
                    if let Some(v) = pick(&p) {
                        return Ok(v);
                    }
                    if matches!(p, Packet::Publish(_)) {
                        self.early.push_back(p);
                    }
                }
                Ok(Some(Err(e))) => bail!("connection ended: {e}"),
                Ok(None) => bail!("connection ended"),
                Err(_) => bail!("timed out"),
            }
        }
    }

    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<PubAckReason> {
        self.publish_with(topic, payload.into(), false).await
    }

    async fn publish_with(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<PubAckReason> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await?;
        self.next(Duration::from_secs(5), |p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .await
    }

    pub async fn subscribe(&mut self, filter: &str) -> Result<SubscribeReasonCode> {
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        self.next(Duration::from_secs(5), |p| match p {
            Packet::SubAck(a) => a.return_codes.first().copied(),
            _ => None,
        })
        .await
    }

    /// The next message delivered to this client.
    pub async fn message(&mut self, timeout: Duration) -> Result<(String, Vec<u8>)> {
        self.next(timeout, |p| match p {
            Packet::Publish(m) => Some((
                String::from_utf8_lossy(&m.topic).into_owned(),
                m.payload.to_vec(),
            )),
            _ => None,
        })
        .await
    }

    /// The next message delivered to this client, with its retain flag (set only on a copy
    /// the broker held retained and sent at subscription).
    pub async fn message_with_retain(
        &mut self,
        timeout: Duration,
    ) -> Result<(String, Vec<u8>, bool)> {
        self.next(timeout, |p| match p {
            Packet::Publish(m) => Some((
                String::from_utf8_lossy(&m.topic).into_owned(),
                m.payload.to_vec(),
                m.retain,
            )),
            _ => None,
        })
        .await
    }

    /// True once the broker has closed the connection, false if it is still open at the deadline.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Packet::Disconnect(_)))) | Ok(Some(Err(_))) | Ok(None) => return true,
                Ok(Some(Ok(_))) => {}
                Err(_) => return false,
            }
        }
    }
}
