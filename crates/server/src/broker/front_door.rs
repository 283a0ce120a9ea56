//! The device MQTT listener's accept loop, ours rather than rmqtt's: rmqtt 0.24 owns its own
//! accept loop and keeps its connection processing crate-private, so nothing could be counted
//! per source address before a connection holds a socket.
//!
//! Each device connection is accepted here, checked against two caps, and relayed byte for
//! byte (still TLS: rmqtt terminates it and checks the certificate) to rmqtt's listener on a
//! loopback port, behind a PROXY protocol v2 header so rmqtt sees the device's own address.
//! - **In all**, at most `max_connections` device connections are open. Each costs three file
//!   descriptors (the device's socket and both ends of the loopback one), and the default
//!   budget leaves [`RESERVED_FDS`] for everything else — the internal listener, the HTTP
//!   listeners, the database — so a flood cannot stop connected devices or the server's own
//!   clients.
//! - **Per source address** (IPv6 by /64), at most `per_address` connections may be *arriving*:
//!   accepted and not yet through CONNECT. A device that connected leaves that count, so a
//!   site's devices behind one NAT are not capped, while one host opening sockets it never
//!   uses fills only its own share.
//! - **One deadline** covers the whole arrival (TCP accepted → TLS → version probe → CONNECT →
//!   authenticated): a connection that is not a session by then is closed. rmqtt's own
//!   version probe has no deadline; this one bounds it.
//!
//! rmqtt's loopback listener trusts the PROXY header of whoever connects to it; it binds
//! 127.0.0.1 only, so only a local process can claim another source address, and it still
//! needs a certificate to get anywhere.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxy_protocol::ProxyHeader;
use proxy_protocol::version2::{ProxyAddresses, ProxyCommand, ProxyTransportProtocol};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::conn_limits::ConnectionGate;

/// File descriptors a relayed device connection holds.
pub const FDS_PER_CONNECTION: u64 = 3;

/// File descriptors the default budget keeps for everything but device connections.
pub const RESERVED_FDS: u64 = 1024;

/// Relay buffer per direction: device packets are small (payloads ≤ 4 KiB), and these are
/// held for every connected device.
const RELAY_BUFFER: usize = 4096;

/// How long the broker may take to finish with a connection whose device went away.
const DRAIN: Duration = Duration::from_secs(5);

/// How the front door admits connections.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub max_connections: usize,
    pub per_address: usize,
    /// From accept to an authenticated session.
    pub deadline: Duration,
}

/// The device connections this process's open-file limit allows once [`RESERVED_FDS`] are set
/// aside. The soft limit is raised to the hard one first.
pub fn connections_within_fd_limit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum.is_some_and(|max| limit.current < Some(max)) {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit.clone()).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    // None means unlimited.
    let fds = limit.current.unwrap_or(1 << 20);
    (fds.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION).max(16) as usize
}

/// Connections accepted and waiting to become sessions, by the device's address as rmqtt
/// sees it (from the PROXY header): the broker's connect hook tells the relay its connection
/// arrived.
#[derive(Debug, Default)]
pub struct Arrivals(Mutex<HashMap<SocketAddr, oneshot::Sender<()>>>);

impl Arrivals {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, oneshot::Sender<()>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection from `addr` became an authenticated session.
    pub fn arrived(&self, addr: SocketAddr) {
        if let Some(tx) = self.map().remove(&addr) {
            let _ = tx.send(());
        }
    }

    fn expect(self: &Arc<Self>, addr: SocketAddr) -> Expected {
        let (tx, rx) = oneshot::channel();
        self.map().insert(addr, tx);
        Expected {
            arrivals: self.clone(),
            addr,
            rx,
        }
    }
}

/// An arrival being waited for; forgotten when dropped.
struct Expected {
    arrivals: Arc<Arrivals>,
    addr: SocketAddr,
    rx: oneshot::Receiver<()>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.arrivals.map().remove(&self.addr);
    }
}

/// Accepts on `public` until the process ends, relaying admitted connections to `broker`.
pub fn spawn(
    public: TcpListener,
    broker: SocketAddr,
    admission: Admission,
    arrivals: Arc<Arrivals>,
) {
    let all = ConnectionGate::new(admission.max_connections, admission.max_connections);
    let arriving = ConnectionGate::new(admission.max_connections, admission.per_address);
    tracing::info!(
        max_connections = admission.max_connections,
        per_address = admission.per_address,
        "MQTT front door admits device connections"
    );
    tokio::spawn(async move {
        loop {
            let (device, from) = match public.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let key = crate::login_limits::address_key(Some(from.ip())).unwrap_or(from.ip());
            let (Some(open), Some(arriving)) = (all.admit(key), arriving.admit(key)) else {
                // Over a cap: closed before it costs more than this socket for a moment.
                continue;
            };
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let _open = open;
                let to = device.local_addr().unwrap_or(broker);
                let upstream = match connect(broker, from, to).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT front door could not reach the broker");
                        return;
                    }
                };
                let _ = device.set_nodelay(true);
                let expected = arrivals.expect(from);
                let relay = relay(device, upstream);
                tokio::pin!(relay);
                tokio::select! {
                    _ = &mut relay => return,
                    _ = tokio::time::sleep(admission.deadline) => return,
                    _ = expected_arrival(expected) => {}
                }
                drop(arriving);
                relay.await;
            });
        }
    });
}

async fn expected_arrival(mut expected: Expected) {
    let _ = (&mut expected.rx).await;
}

/// A loopback connection to the broker that starts with a PROXY v2 header naming the device.
async fn connect(
    broker: SocketAddr,
    from: SocketAddr,
    to: SocketAddr,
) -> anyhow::Result<TcpStream> {
    let mut upstream = TcpStream::connect(broker).await?;
    upstream.set_nodelay(true)?;
    upstream.write_all(&proxy_header(from, to)?).await?;
    Ok(upstream)
}

/// The PROXY protocol v2 header for a TCP connection from `from` to `to` (both as IPv6 when
/// either is).
pub fn proxy_header(from: SocketAddr, to: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let addresses = match (from, to) {
        (SocketAddr::V4(source), SocketAddr::V4(destination)) => ProxyAddresses::Ipv4 {
            source,
            destination,
        },
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => {
                    std::net::SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)
                }
                SocketAddr::V6(v6) => v6,
            };
            ProxyAddresses::Ipv6 {
                source: v6(from),
                destination: v6(to),
            }
        }
    };
    let header = ProxyHeader::Version2 {
        command: ProxyCommand::Proxy,
        transport_protocol: ProxyTransportProtocol::Stream,
        addresses,
    };
    Ok(proxy_protocol::encode(header)?.to_vec())
}

/// Moves bytes both ways until either side is done. When the broker closes, the device's
/// connection closes with it; when the device goes away, the broker sees its end of file (and
/// publishes the device's will if there was no DISCONNECT) and has [`DRAIN`] to finish.
async fn relay(device: TcpStream, broker: TcpStream) {
    let (device_rx, mut device_tx) = device.into_split();
    let (broker_rx, mut broker_tx) = broker.into_split();
    let upward = async {
        let mut from = BufReader::with_capacity(RELAY_BUFFER, device_rx);
        let _ = tokio::io::copy_buf(&mut from, &mut broker_tx).await;
        let _ = broker_tx.shutdown().await;
    };
    let downward = async {
        let mut from = BufReader::with_capacity(RELAY_BUFFER, broker_rx);
        let _ = tokio::io::copy_buf(&mut from, &mut device_tx).await;
        let _ = device_tx.shutdown().await;
    };
    tokio::pin!(upward, downward);
    tokio::select! {
        _ = &mut downward => {}
        _ = &mut upward => {
            let _ = tokio::time::timeout(DRAIN, downward).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> ProxyHeader {
        let mut slice = bytes;
        let header = proxy_protocol::parse(&mut slice).expect("a PROXY header");
        assert!(slice.is_empty(), "the header is all that was written");
        header
    }

    #[test]
    fn the_proxy_header_names_the_device_address_as_the_broker_reads_it() {
        let from: SocketAddr = "192.0.2.7:40001".parse().unwrap();
        let to: SocketAddr = "198.51.100.1:8883".parse().unwrap();
        match parse(&proxy_header(from, to).unwrap()) {
            ProxyHeader::Version2 {
                command: ProxyCommand::Proxy,
                transport_protocol: ProxyTransportProtocol::Stream,
                addresses:
                    ProxyAddresses::Ipv4 {
                        source,
                        destination,
                    },
            } => assert_eq!(
                (SocketAddr::V4(source), SocketAddr::V4(destination)),
                (from, to)
            ),
            other => panic!("unexpected header {other:?}"),
        }
        let from6: SocketAddr = "[2001:db8::7]:40001".parse().unwrap();
        match parse(&proxy_header(from6, to).unwrap()) {
            ProxyHeader::Version2 {
                addresses:
                    ProxyAddresses::Ipv6 {
                        source,
                        destination,
                    },
                ..
            } => {
                assert_eq!(SocketAddr::V6(source), from6);
                assert_eq!(
                    destination.ip().to_ipv4_mapped(),
                    Some([198, 51, 100, 1].into())
                );
            }
            other => panic!("unexpected header {other:?}"),
        }
    }

    #[test]
    fn the_fd_budget_raises_the_soft_limit_and_keeps_the_reserve() {
        use rustix::process::{Resource, getrlimit};
        let n = connections_within_fd_limit() as u64;
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(
            limit.current, limit.maximum,
            "the soft limit was raised to the hard one"
        );
        let fds = limit.current.unwrap_or(1 << 20);
        assert_eq!(n, (fds.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION).max(16));
        assert!(n * FDS_PER_CONNECTION + RESERVED_FDS <= fds);
    }
}
