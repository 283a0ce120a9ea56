//! Behind a load balancer that speaks the PROXY protocol (`--proxy-protocol-from`): the
//! limits count the clients its headers name, not the balancer; a header from anyone else is
//! not believed, and the balancer's connection without one is closed.
#![allow(clippy::unwrap_used)]

use flotilla_e2e::Server;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The balancer's address: loopback, but not the one the harness itself connects from.
const BALANCER: &str = "127.0.0.2";

async fn connect_from(from: &str, port: u16) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

fn v1_header(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 8080\r\n").into_bytes()
}

fn v2_header(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0x20, 0xfb]);
    h
}

/// A login over one connection from `from`, prefixed with `header`: the response's status,
/// or `None` when the connection closed without one.
async fn login(
    server: &Server,
    from: &str,
    header: &[u8],
    email: &str,
    password: &str,
) -> Option<u16> {
    let port: u16 = server.http.rsplit(':').next().unwrap().parse().unwrap();
    let mut tcp = connect_from(from, port).await;
    let body = json!({"email": email, "password": password}).to_string();
    let request = format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: flotilla\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(request.as_bytes());
    // The server may close before reading it all.
    let _ = tcp.write_all(&bytes).await;
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .map(|code| code.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_lock_the_client_the_balancer_names_not_the_balancer() {
    let server = Server::start(&["--proxy-protocol-from", BALANCER])
        .await
        .unwrap();
    server.admin("admin@x.io").await.unwrap();
    let guesser = v1_header("203.0.113.7");
    for k in 0..5 {
        assert_eq!(
            login(&server, BALANCER, &guesser, "admin@x.io", "wrong").await,
            Some(401),
            "guess {k}"
        );
    }
    // The guesser is refused, even with the right password ...
    assert_eq!(
        login(&server, BALANCER, &guesser, "admin@x.io", "admin-pass").await,
        Some(429)
    );
    // ... while the admin, through the same balancer from elsewhere (a v2 header), is not.
    let admin = v2_header([198, 51, 100, 20]);
    assert_eq!(
        login(&server, BALANCER, &admin, "admin@x.io", "admin-pass").await,
        Some(200)
    );
    // The refusal is audited under the client's address.
    let token = server.login("admin@x.io", "admin-pass").await.unwrap();
    let audit = server.audit(&token, "auth.login").await.unwrap();
    let audit = serde_json::Value::Array(audit).to_string();
    assert!(audit.contains("203.0.113.7"), "{audit}");
    assert!(!audit.contains(BALANCER), "{audit}");

    // The balancer's connection without a header, or with a malformed one, is closed
    // unanswered; a header from a client that is not the balancer is not believed (not
    // HTTP: 400), so it logs nobody in.
    assert_eq!(
        login(&server, BALANCER, b"", "admin@x.io", "admin-pass").await,
        None
    );
    assert_eq!(
        login(&server, BALANCER, b"PROXY TCP4 1.2.3", "admin@x.io", "x").await,
        None
    );
    let forged = v1_header("198.51.100.20");
    assert_eq!(
        login(&server, "127.0.0.3", &forged, "admin@x.io", "admin-pass").await,
        Some(400)
    );
}

/// A TLS handshake with the device listener over `tcp` (no client certificate, as a device
/// that is not yet provisioned): whether it completed.
async fn tls_handshake(server: &Server, tcp: TcpStream) -> Option<impl Drop> {
    flotilla_e2e::init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(server.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()
        .map(Box::new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_listeners_cap_per_address_counts_the_clients_behind_the_balancer() {
    let server = Server::start(&[
        "--proxy-protocol-from",
        BALANCER,
        "--device-listener-per-address",
        "2",
    ])
    .await
    .unwrap();
    let through_balancer = |client: [u8; 4]| {
        let server = &server;
        async move {
            let mut tcp = connect_from(BALANCER, server.device_port).await;
            tcp.write_all(&v2_header(client)).await.unwrap();
            tls_handshake(server, tcp).await
        }
    };
    // Two open connections for one client behind the balancer fill its share ...
    let a1 = through_balancer([203, 0, 113, 1]).await;
    let a2 = through_balancer([203, 0, 113, 1]).await;
    assert!(a1.is_some() && a2.is_some());
    assert!(
        through_balancer([203, 0, 113, 1]).await.is_none(),
        "a third connection for the same client was admitted"
    );
    // ... and nobody else's: another client through the same balancer is admitted.
    assert!(through_balancer([203, 0, 113, 2]).await.is_some());
}
