//! The PROXY protocol (v1 text and v2 binary, as HAProxy sends with `send-proxy` and
//! `send-proxy-v2`) on connections from a load balancer the operator names
//! (`--proxy-protocol-from`). Behind one, every TCP peer is the balancer: the per-address
//! connection caps and the login, registration and certificate-request limits would count
//! the whole fleet and every user as one address. A balancer's connection starts with a header
//! naming the client; that client is then the connection's address. Other peers' connections
//! are served as they are, so a header from them is never believed (it is neither HTTP nor
//! TLS: the user API answers 400, the device listener's handshake fails).
//!
//! The header is read byte-exact (nothing after it is consumed: TLS or HTTP follows), within
//! a deadline, and bounded in size; anything malformed closes the connection. Anyone who can
//! connect from a named address can claim to be any client: name the balancers' own
//! addresses, not the networks around them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 header's first 12 bytes.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header's length at most, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// The address block (and TLVs) of a v2 header at most; HAProxy's are far below.
const V2_MAX_BODY: usize = 1024;

/// Who a balancer's connection is from: a client (an IPv4-mapped IPv6 address as IPv4, so
/// one client is counted under one key), or the balancer itself (a health check:
/// v2 `LOCAL`, v1 `UNKNOWN`, or an address family other than TCP over IPv4/IPv6), which keeps
/// the TCP peer's address.
pub type Source = Option<SocketAddr>;

/// Why a header was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The connection ended or failed before the header did.
    Io(String),
    /// Not a PROXY header, or not a well-formed one.
    Malformed(&'static str),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Io(e) => write!(f, "connection failed before its PROXY header: {e}"),
            HeaderError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
        }
    }
}

impl From<std::io::Error> for HeaderError {
    fn from(e: std::io::Error) -> Self {
        HeaderError::Io(e.to_string())
    }
}

/// Reads the PROXY header at the start of `io` and no byte past it.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<Source, HeaderError> {
    let mut head = [0u8; 16];
    io.read_exact(&mut head[..6]).await?;
    if &head[..6] == b"PROXY " {
        let mut line = head[..6].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() == V1_MAX {
                return Err(HeaderError::Malformed("v1 line too long"));
            }
            line.push(io.read_u8().await?);
        }
        return parse_v1(&line);
    }
    if head[..6] != V2_SIGNATURE[..6] {
        return Err(HeaderError::Malformed("no PROXY signature"));
    }
    io.read_exact(&mut head[6..]).await?;
    if head[..12] != V2_SIGNATURE {
        return Err(HeaderError::Malformed("no PROXY signature"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_BODY {
        return Err(HeaderError::Malformed("v2 address block too long"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    parse_v2(&head, &body)
}

/// A whole v1 line, `PROXY ` to CRLF.
fn parse_v1(line: &[u8]) -> Result<Source, HeaderError> {
    let bad = HeaderError::Malformed;
    let text = std::str::from_utf8(line).map_err(|_| bad("v1 line is not text"))?;
    let text = text
        .strip_prefix("PROXY ")
        .and_then(|t| t.strip_suffix("\r\n"))
        .ok_or(bad("v1 line framing"))?;
    let mut words = text.split(' ');
    let family = words.next().ok_or(bad("v1 family"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = words.collect();
    let [src, _dst, src_port, _dst_port] = fields[..] else {
        return Err(bad("v1 needs two addresses and two ports"));
    };
    let ip = match family {
        "TCP4" => IpAddr::V4(Ipv4Addr::from_str(src).map_err(|_| bad("v1 IPv4 address"))?),
        "TCP6" => IpAddr::V6(Ipv6Addr::from_str(src).map_err(|_| bad("v1 IPv6 address"))?),
        _ => return Err(bad("v1 family")),
    };
    // No sign, no leading zeros beyond "0": the spec's form, nothing u16's parser also takes.
    if src_port.starts_with('+') || (src_port.len() > 1 && src_port.starts_with('0')) {
        return Err(bad("v1 port"));
    }
    let port = src_port.parse::<u16>().map_err(|_| bad("v1 port"))?;
    Ok(Some(SocketAddr::new(ip.to_canonical(), port)))
}

/// A v2 header: its 16 fixed bytes and the block after them.
fn parse_v2(head: &[u8; 16], body: &[u8]) -> Result<Source, HeaderError> {
    let bad = HeaderError::Malformed;
    if head[..12] != V2_SIGNATURE {
        return Err(bad("no PROXY signature"));
    }
    if head[12] >> 4 != 2 {
        return Err(bad("v2 version"));
    }
    match head[12] & 0x0f {
        0 => return Ok(None),
        1 => {}
        _ => return Err(bad("v2 command")),
    }
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match head[13] {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            if body.len() < 12 {
                return Err(bad("v2 IPv4 block too short"));
            }
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        0x21 => {
            if body.len() < 36 {
                return Err(bad("v2 IPv6 block too short"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)).to_canonical(),
                port(32),
            )))
        }
        // UNSPEC, UDP, UNIX: the spec says to keep the connection's own address.
        _ => Ok(None),
    }
}

/// One address or network whose connections carry a PROXY header (`10.0.0.5`,
/// `172.16.0.0/12`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyPeer(ipnet::IpNet);

impl ProxyPeer {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for ProxyPeer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(ip) = IpAddr::from_str(s) {
            return Ok(ProxyPeer(ipnet::IpNet::from(ip.to_canonical())));
        }
        let net = ipnet::IpNet::from_str(s)
            .map_err(|_| format!("{s:?} is not an IP address or network (10.0.0.5, 10.0.0.0/8)"))?;
        if net.prefix_len() == 0 {
            // Every host could then claim any client address.
            return Err(format!(
                "{s:?} names every address: name the load balancers"
            ));
        }
        Ok(ProxyPeer(net.trunc()))
    }
}

impl std::fmt::Display for ProxyPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl serde::Serialize for ProxyPeer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The balancers named by `--proxy-protocol-from`.
#[derive(Debug, Clone, Default)]
pub struct ProxyPeers(std::sync::Arc<Vec<ProxyPeer>>);

impl ProxyPeers {
    pub fn new(peers: &[ProxyPeer]) -> ProxyPeers {
        ProxyPeers(std::sync::Arc::new(peers.to_vec()))
    }

    /// Whether a connection from `ip` must start with a PROXY header.
    pub fn sends_header(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|p| p.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Source, HeaderError>, Vec<u8>) {
        let mut io = bytes;
        let header = read_header(&mut io).await;
        (header, io.to_vec())
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[tokio::test]
    async fn v1_and_v2_headers_name_the_client_and_leave_what_follows_unread() {
        let (h, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.2 51000 8080\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(h, Ok(Some("203.0.113.7:51000".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (h, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 443 8443\r\n").await;
        assert_eq!(h, Ok(Some("[2001:db8::1]:443".parse().unwrap())));
        let (h, _) = read(b"PROXY TCP6 ::ffff:203.0.113.9 ::1 443 8443\r\n").await;
        assert_eq!(
            h,
            Ok(Some("203.0.113.9:443".parse().unwrap())),
            "mapped: as IPv4"
        );
        let (h, rest) = read(b"PROXY UNKNOWN\r\n\x16\x03").await;
        assert_eq!((h, rest.as_slice()), (Ok(None), &b"\x16\x03"[..]));

        let mut ipv4 = vec![198, 51, 100, 9, 10, 0, 0, 2];
        ipv4.extend_from_slice(&40_000u16.to_be_bytes());
        ipv4.extend_from_slice(&8443u16.to_be_bytes());
        // A TLV after the addresses is read and skipped.
        ipv4.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        let mut bytes = v2(1, 0x11, &ipv4);
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (h, rest) = read(&bytes).await;
        assert_eq!(h, Ok(Some("198.51.100.9:40000".parse().unwrap())));
        assert_eq!(rest, b"\x16\x03\x01");
        let mut ipv6 = vec![0u8; 36];
        ipv6[15] = 1;
        ipv6[32..34].copy_from_slice(&7u16.to_be_bytes());
        let (h, _) = read(&v2(1, 0x21, &ipv6)).await;
        assert_eq!(h, Ok(Some("[::1]:7".parse().unwrap())));
        // LOCAL (the balancer's health check) and UNIX keep the peer's own address.
        assert_eq!(read(&v2(0, 0x00, &[])).await.0, Ok(None));
        assert_eq!(read(&v2(1, 0x31, &[0; 216])).await.0, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused_without_reading_past_the_bound() {
        let malformed =
            |h: Result<Source, HeaderError>| matches!(h, Err(HeaderError::Malformed(_)));
        for bytes in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.2 51000\r\n",
            b"PROXY TCP4 ::1 10.0.0.2 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 1\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 1\r\n",
        ] {
            assert!(
                malformed(read(bytes).await.0),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // The bound itself: 107 bytes with CRLF are read, 108 are not.
        let line = |len: usize| {
            let mut l = b"PROXY UNKNOWN ".to_vec();
            l.resize(len - 2, b'x');
            l.extend_from_slice(b"\r\n");
            l
        };
        assert_eq!(read(&line(V1_MAX)).await.0, Ok(None));
        assert!(malformed(read(&line(V1_MAX + 1)).await.0));
        let mut long = b"PROXY ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 500));
        let (h, rest) = read(&long).await;
        assert!(malformed(h));
        assert_eq!(
            rest.len(),
            500 + 6 - V1_MAX,
            "read no further than the v1 bound"
        );
        assert!(malformed(read(&v2(1, 0x11, &[1, 2, 3])).await.0));
        assert!(malformed(read(&v2(1, 0x21, &[0; 12])).await.0));
        assert!(malformed(read(&v2(2, 0x11, &[0; 12])).await.0));
        let mut version3 = v2(1, 0x11, &[0; 12]);
        version3[12] = 0x31;
        assert!(malformed(read(&version3).await.0));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(malformed(read(&huge).await.0));
        // A header cut short is an I/O error, not a guess.
        assert!(matches!(
            read(b"PROXY TCP4 1.2.3.4").await.0,
            Err(HeaderError::Io(_))
        ));
        assert!(matches!(
            read(&V2_SIGNATURE[..9]).await.0,
            Err(HeaderError::Io(_))
        ));
    }

    #[test]
    fn peers_are_addresses_or_networks_and_match_mapped_ipv4() {
        let peers: Vec<ProxyPeer> = ["10.0.0.5", "172.16.0.0/12", "fd00::/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let peers = ProxyPeers::new(&peers);
        for (ip, trusted) in [
            ("10.0.0.5", true),
            ("10.0.0.6", false),
            ("172.31.255.1", true),
            ("::ffff:172.20.0.3", true),
            ("fd12::1", true),
            ("2001:db8::1", false),
        ] {
            assert_eq!(peers.sends_header(ip.parse().unwrap()), trusted, "{ip}");
        }
        assert!("10.0.0.0/33".parse::<ProxyPeer>().is_err());
        assert!("0.0.0.0/0".parse::<ProxyPeer>().is_err());
        assert!("::/0".parse::<ProxyPeer>().is_err());
        let mapped: ProxyPeer = "::ffff:10.0.0.9".parse().unwrap();
        assert!(mapped.contains("10.0.0.9".parse().unwrap()));
        assert!("balancer".parse::<ProxyPeer>().is_err());
        assert_eq!(
            "10.1.2.3/8".parse::<ProxyPeer>().unwrap().to_string(),
            "10.0.0.0/8"
        );
    }
}
