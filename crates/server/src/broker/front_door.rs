//! The device MQTT listener's accept loop, ours rather than rmqtt's: rmqtt 0.24 owns its own
//! accept loop and keeps its connection processing crate-private, so nothing could be counted
//! per source address before a connection holds a socket.
//!
//! Each device connection is accepted here, checked against two caps, and relayed byte for
//! byte (still TLS: rmqtt terminates it and checks the certificate) to rmqtt's listener on a
//! loopback port, behind a PROXY protocol v2 header so rmqtt sees the device's own address.
//! - **In all**, at most `max_connections` device connections are open. Each costs three file
//!   descriptors (the device's socket and both ends of the loopback one) and one loopback
//!   port; the default budget ([`device_connection_budget`]) leaves the HTTP listeners' caps
//!   and [`RESERVED_FDS`] more for the internal listener, the database and files, so a flood
//!   of MQTT connections cannot take the descriptors connected devices and the server's own
//!   clients need.
//! - **Per source address** (IPv6 by /64), at most `per_address` connections may be *arriving*:
//!   accepted and not yet through CONNECT. A device that connected leaves that count, so a
//!   site's devices behind one NAT are not capped, while one host opening sockets it never
//!   uses fills only its own share.
//! - **One deadline** covers the whole arrival (TCP accepted → TLS → version probe → CONNECT →
//!   authenticated): a connection that is not a session by then is closed. rmqtt's own
//!   version probe has no deadline; this one bounds it.
//!
//! rmqtt's loopback listener trusts the PROXY header of whoever connects to it and reads it in
//! its accept loop, one connection at a time: a local process (only: it binds 127.0.0.1) can
//! claim another source address, bypass these caps, and stall device admissions by
//! connecting and sending nothing (up to the 1 s PROXY timeout each time). It still needs a
//! certificate to become a session.

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

/// File descriptors kept for the server's own use besides the HTTP listeners' caps (the
/// internal listener and its clients, the database pool, files).
pub const RESERVED_FDS: u64 = 512;

/// How long the broker may take to finish with a connection whose device went away.
const DRAIN: Duration = Duration::from_secs(5);

/// How long bytes may wait for a side that takes none (a device that stopped reading).
const WRITE_STALL: Duration = Duration::from_secs(30);

/// How the front door admits connections.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub max_connections: usize,
    pub per_address: usize,
    /// From accept to an authenticated session.
    pub deadline: Duration,
}

/// The device connections this process can hold once `reserved` descriptors are set aside
/// for everything else: three descriptors each, and one loopback port each (every relayed
/// connection goes from 127.0.0.1 to one broker port, so the local port range bounds them).
/// The soft open-file limit is raised to the hard one first.
pub fn device_connection_budget(reserved: u64) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum.is_some_and(|max| limit.current < Some(max)) {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    // None means unlimited.
    let fds = limit.current.unwrap_or(1 << 20);
    let by_fds = fds.saturating_sub(reserved) / FDS_PER_CONNECTION;
    let by_ports = local_ports().saturating_sub(1024);
    let budget = by_fds.min(by_ports);
    if budget < 16 {
        tracing::warn!(
            open_file_limit = fds,
            reserved,
            "the open-file limit leaves almost nothing for MQTT devices; allowing 16"
        );
    }
    budget.max(16) as usize
}

/// How many ephemeral ports the kernel hands out for outgoing connections.
fn local_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u64>().ok());
            Some(it.next()??.abs_diff(it.next()??) + 1)
        })
        // Linux's default range, 32768-60999.
        .unwrap_or(28_232)
}

/// Connections accepted and waiting to become sessions, by the device's address as rmqtt
/// sees it (from the PROXY header): the broker's connect hook tells the relay its connection
/// arrived. Each entry carries a generation, so a connection only ever forgets its own.
#[derive(Debug, Default)]
pub struct Arrivals(Mutex<Waiting>);

/// The last generation given out, and who waits under which generation.
#[derive(Debug, Default)]
struct Waiting {
    generation: u64,
    by_address: HashMap<SocketAddr, (u64, oneshot::Sender<()>)>,
}

impl Arrivals {
    fn map(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection from `addr` became an authenticated session.
    pub fn arrived(&self, addr: SocketAddr) {
        if let Some((_, tx)) = self.map().by_address.remove(&addr) {
            let _ = tx.send(());
        }
    }

    /// `None` when a connection from the same address and port is already arriving (a
    /// multi-homed host can make one): the broker could not tell the two apart.
    fn expect(self: &Arc<Self>, addr: SocketAddr) -> Option<Expected> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.map();
        if map.by_address.contains_key(&addr) {
            return None;
        }
        map.generation += 1;
        let generation = map.generation;
        map.by_address.insert(addr, (generation, tx));
        Some(Expected {
            arrivals: self.clone(),
            addr,
            generation,
            rx,
        })
    }
}

/// An arrival being waited for; forgotten when dropped.
struct Expected {
    arrivals: Arc<Arrivals>,
    addr: SocketAddr,
    generation: u64,
    rx: oneshot::Receiver<()>,
}

impl Expected {
    /// Returns once the broker reported the session; never if it does not.
    async fn arrival(&mut self) {
        if (&mut self.rx).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        let mut map = self.arrivals.map();
        if map
            .by_address
            .get(&self.addr)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            map.by_address.remove(&self.addr);
        }
    }
}

/// Counts connections closed at a cap, and says so in the log at most once a minute.
struct Shed {
    total: u64,
    logged: Option<tokio::time::Instant>,
}

impl Shed {
    fn note(&mut self, why: &'static str, from: SocketAddr) {
        self.total += 1;
        let now = tokio::time::Instant::now();
        if self
            .logged
            .is_none_or(|t| now - t >= Duration::from_secs(60))
        {
            self.logged = Some(now);
            tracing::warn!(why, last_from = %from.ip(), shed_so_far = self.total, "MQTT connections closed at a cap");
        }
    }
}

/// The loopback port of rmqtt's current device listener: it changes when the server
/// certificate is renewed (rmqtt reads its certificate once, so a new listener is bound).
#[derive(Debug)]
pub struct BrokerPort(std::sync::atomic::AtomicU16);

impl BrokerPort {
    pub fn new(port: u16) -> BrokerPort {
        BrokerPort(std::sync::atomic::AtomicU16::new(port))
    }

    pub fn set(&self, port: u16) {
        self.0.store(port, std::sync::atomic::Ordering::SeqCst);
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((
            [127, 0, 0, 1],
            self.0.load(std::sync::atomic::Ordering::SeqCst),
        ))
    }
}

/// Accepts on `public` until the process ends, relaying admitted connections to `broker`'s
/// port at the time each arrives.
pub fn spawn(
    public: TcpListener,
    broker: Arc<BrokerPort>,
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
        let mut shed = Shed {
            total: 0,
            logged: None,
        };
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
            let deadline = tokio::time::Instant::now() + admission.deadline;
            let key = crate::login_limits::address_key(Some(from.ip())).unwrap_or(from.ip());
            let Some(open) = all.admit(key) else {
                // Closed before it costs more than this socket for a moment.
                shed.note("all device connections in use", from);
                continue;
            };
            let Some(arriving) = arriving.admit(key) else {
                shed.note("too many arriving from one address", from);
                continue;
            };
            let Some(mut expected) = arrivals.expect(from) else {
                shed.note("same address and port already arriving", from);
                continue;
            };
            let broker = broker.addr();
            tokio::spawn(async move {
                let _open = open;
                let _ = device.set_nodelay(true);
                // rmqtt set keep-alive probes on the sockets it accepted; it now accepts the
                // loopback one, so the device's gets them here (a device gone without a FIN
                // and with MQTT keep-alive 0 is still found).
                let _ = rustix::net::sockopt::set_socket_keepalive(&device, true);
                let to = device.local_addr().unwrap_or(broker);
                let upstream = match tokio::time::timeout_at(deadline, connect(broker, from, to))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "MQTT front door could not reach the broker");
                        return;
                    }
                    Err(_) => return,
                };
                let relay = relay(device, upstream);
                tokio::pin!(relay);
                tokio::select! {
                    _ = &mut relay => return,
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = expected.arrival() => {}
                }
                drop((arriving, expected));
                relay.await;
            });
        }
    });
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
/// publishes the device's will if there was no DISCONNECT) and has [`DRAIN`] to finish. A side
/// that takes no byte for [`WRITE_STALL`] while some wait for it ends the relay (a device that
/// stops reading cannot hold its sockets once the broker gave up on it).
async fn relay(device: TcpStream, broker: TcpStream) {
    relay_with_stall(device, broker, WRITE_STALL).await
}

async fn relay_with_stall(device: TcpStream, broker: TcpStream, stall: Duration) {
    let upward = pump(&device, &broker, stall);
    let downward = pump(&broker, &device, stall);
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
    /// device holds no relay buffer. Its size is only how much one read takes.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; 16 * 1024].into_boxed_slice());
}

/// What one read-and-forward step did.
enum Step {
    Forwarded,
    /// `to` took only part: the rest, to be written before reading more.
    Backlog(Vec<u8>),
    Ended,
}

/// Moves bytes from `from` to `to` until `from` ends or fails, then half-closes `to`. Bytes
/// `to` cannot take at once are the only ones copied into a buffer of their own, and nothing
/// more is read until they are written (backpressure reaches the sender); if they are not
/// taken within `stall`, the pump gives up.
async fn pump(from: &TcpStream, to: &TcpStream, stall: Duration) -> std::io::Result<()> {
    let result = forward(from, to, stall).await;
    // Also after an error (a reset): the other side must see the end at once.
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    result
}

async fn forward(from: &TcpStream, to: &TcpStream, stall: Duration) -> std::io::Result<()> {
    use std::io::ErrorKind::WouldBlock;
    let mut backlog = Vec::new();
    loop {
        if !backlog.is_empty() {
            tokio::time::timeout(stall, to.writable())
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading")
                })??;
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
            Step::Ended => return Ok(()),
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_that_stops_reading_cannot_hold_the_relay_once_the_broker_is_gone() {
        let (device, device_side) = pair().await;
        let (broker_side, mut broker) = pair().await;
        let relay = tokio::spawn(relay_with_stall(
            device_side,
            broker_side,
            Duration::from_millis(500),
        ));
        // The device reads nothing; the broker writes far more than the kernels buffer, then
        // closes (as rmqtt does on a keep-alive timeout).
        let chunk = vec![7u8; 64 * 1024];
        let mut blocked = false;
        for _ in 0..1000 {
            match tokio::time::timeout(Duration::from_millis(200), broker.write_all(&chunk)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
        }
        assert!(
            blocked,
            "the broker's writes never blocked: no backpressure"
        );
        drop(broker);
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the relay ended although the device never read")
            .unwrap();
        drop(device);
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

    #[tokio::test]
    async fn an_arrival_is_only_ever_its_own() {
        let arrivals = Arc::new(Arrivals::default());
        let addr: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let first = arrivals.expect(addr).expect("nobody waits yet");
        assert!(
            arrivals.expect(addr).is_none(),
            "the same address and port twice"
        );
        drop(first);
        let mut second = arrivals.expect(addr).expect("free again");
        arrivals.arrived(addr);
        tokio::time::timeout(Duration::from_secs(1), second.arrival())
            .await
            .expect("the broker's report reached the waiting connection");
        // A waiter whose entry went away without a report never counts as arrived.
        let mut third = arrivals.expect(addr).expect("free again");
        arrivals.map().by_address.clear();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), third.arrival())
                .await
                .is_err()
        );
    }

    #[test]
    fn the_budget_raises_the_soft_limit_and_keeps_the_reserve_and_the_port_range() {
        use rustix::process::{Resource, getrlimit};
        let reserved = 5_000;
        let n = device_connection_budget(reserved) as u64;
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(
            limit.current, limit.maximum,
            "the soft limit was raised to the hard one"
        );
        let fds = limit.current.unwrap_or(1 << 20);
        assert!(n * FDS_PER_CONNECTION + reserved <= fds || n == 16);
        assert!(n + 1024 <= local_ports());
        assert!(
            local_ports() > 1024,
            "read the port range: {}",
            local_ports()
        );
        // Nothing left: the floor, not an underflow.
        assert_eq!(device_connection_budget(u64::MAX), 16);
    }
}
