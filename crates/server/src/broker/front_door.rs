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
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::conn_limits::ConnectionGate;

/// File descriptors a relayed device connection holds.
pub const FDS_PER_CONNECTION: u64 = 3;

/// File descriptors the default budget keeps for everything but device connections.
pub const RESERVED_FDS: u64 = 1024;

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
    let upward = pump(&device, &broker);
    let downward = pump(&broker, &device);
    tokio::pin!(upward, downward);
    tokio::select! {
        _ = &mut downward => {}
        _ = &mut upward => {
            let _ = tokio::time::timeout(DRAIN, downward).await;
        }
    }
}

thread_local! {
    /// Where a pump reads to: one per worker thread, not one per connection, so an idle
    /// device costs the relay no buffer (a TLS record is at most 16 KiB and some).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; 17 * 1024].into_boxed_slice());
}

/// What one read-and-forward step did.
enum Step {
    Forwarded,
    /// `to` took only part: the rest, to be written before reading more.
    Backlog(Vec<u8>),
    Ended,
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`. Bytes `to` cannot
/// take at once are the only ones copied into a buffer of their own, and nothing more is read
/// until they are written (backpressure reaches the sender).
async fn pump(from: &TcpStream, to: &TcpStream) -> std::io::Result<()> {
    use std::io::ErrorKind::WouldBlock;
    let mut backlog = Vec::new();
    loop {
        if !backlog.is_empty() {
            to.writable().await?;
            match to.try_write(&backlog) {
                Ok(n) => drop(backlog.drain(..n)),
                Err(e) if e.kind() == WouldBlock => {}
                Err(e) => return Err(e),
            }
            if backlog.is_empty() {
                backlog = Vec::new();
            }
            continue;
        }
        from.readable().await?;
        let step = SCRATCH.with_borrow_mut(|buf| {
            let n = match from.try_read(buf) {
                Ok(0) => return Ok(Step::Ended),
                Ok(n) => n,
                Err(e) if e.kind() == WouldBlock => return Ok(Step::Forwarded),
                Err(e) => return Err(e),
            };
            let written = match to.try_write(&buf[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == WouldBlock => 0,
                Err(e) => return Err(e),
            };
            Ok(if written < n {
                Step::Backlog(buf[written..n].to_vec())
            } else {
                Step::Forwarded
            })
        })?;
        match step {
            Step::Forwarded => {}
            Step::Backlog(rest) => backlog = rest,
            Step::Ended => break,
        }
    }
    rustix::net::shutdown(to, rustix::net::Shutdown::Write)?;
    Ok(())
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

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_moves_every_byte_in_order_under_backpressure_and_passes_each_end_on() {
        use tokio::io::AsyncReadExt;
        let (mut device, device_side) = pair().await;
        let (broker_side, mut broker) = pair().await;
        let relay = tokio::spawn(relay(device_side, broker_side));

        // 8 MiB upward while the broker reads nothing for a while: the kernel buffers fill,
        // the pump holds a backlog and stops reading, and nothing is lost or reordered.
        let sent: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            device.write_all(&sent).await.unwrap();
            device
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = vec![0; expected.len()];
        broker.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "bytes lost or reordered");
        let mut device = writer.await.unwrap();

        // The broker closes: the device reads what it last sent, then the end.
        broker.write_all(b"bye").await.unwrap();
        drop(broker);
        let mut tail = Vec::new();
        device.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"bye");
        tokio::time::timeout(Duration::from_secs(2), relay)
            .await
            .expect("the relay ended with the broker's side")
            .unwrap();
    }

    #[tokio::test]
    async fn a_device_that_goes_away_is_an_end_of_file_for_the_broker() {
        use tokio::io::AsyncReadExt;
        let (mut device, device_side) = pair().await;
        let (broker_side, mut broker) = pair().await;
        tokio::spawn(relay(device_side, broker_side));
        device.write_all(b"last words").await.unwrap();
        drop(device);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), broker.read_to_end(&mut got))
            .await
            .expect("the broker saw the end")
            .unwrap();
        assert_eq!(got, b"last words");
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
        assert_eq!(
            n,
            (fds.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION).max(16)
        );
        assert!(n * FDS_PER_CONNECTION + RESERVED_FDS <= fds);
    }
}
