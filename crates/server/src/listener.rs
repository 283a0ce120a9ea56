//! The accept loop of the HTTP listeners (the device listener over TLS, the user API in plain
//! HTTP): connection caps in total and per source address ([`ConnectionGate`]), a deadline for
//! the TLS handshake, one for each request's headers and one for its body, and the peer's
//! address (or, behind a named load balancer, the client its PROXY header names) and, over
//! TLS, its verified certificate identity added to every request.
//!
//! Both speak HTTP/1.1 only. hyper's HTTP/2 server has no deadline for the connection
//! preface or for a connection that opens no stream, so a client that negotiated `h2` and went
//! silent would hold its connection for ever; neither devices nor the CLI need HTTP/2.

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::conn_limits::ConnectionGate;
use crate::device_listener::PeerIdentity;
use crate::proxy_protocol::ProxyPeers;

/// How long a connection may take to finish its TLS handshake, to send a request's headers,
/// and (on the device listener, whose bodies are at most 16 KiB) to send a request's body.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a balancer's connection may take to send its PROXY header (balancers send it
/// as they connect).
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// What a connection speaks below HTTP.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(TlsAcceptor),
}

/// Accepts on `listener` until the process ends. A connection from one of `proxies` names its
/// client in a PROXY header first ([`crate::proxy_protocol`]); that client is its address,
/// for the caps and for the routes.
pub fn spawn(
    listener: TcpListener,
    transport: Transport,
    app: Router,
    gate: ConnectionGate,
    proxies: ProxyPeers,
) {
    tokio::spawn(async move {
        loop {
            let (mut stream, peer_addr) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (transport, app, gate) = (transport.clone(), app.clone(), gate.clone());
            if !proxies.sends_header(peer_addr.ip()) {
                let Some(admitted) = gate.admit(peer_addr.ip()) else {
                    // Over a cap: closing now costs the socket nothing more.
                    drop(stream);
                    continue;
                };
                tokio::spawn(async move {
                    let _admitted = admitted;
                    connection(stream, peer_addr, transport, app).await;
                });
                continue;
            }
            // Until its header names the client, a balancer's connection holds a slot of the
            // balancer's own: a peer that opens connections and sends nothing fills that share.
            let Some(pending) = gate.admit(peer_addr.ip()) else {
                drop(stream);
                continue;
            };
            tokio::spawn(async move {
                let header = tokio::time::timeout(
                    PROXY_HEADER_TIMEOUT,
                    crate::proxy_protocol::read_header(&mut stream),
                )
                .await;
                drop(pending);
                let client = match header {
                    Ok(Ok(source)) => source.unwrap_or(peer_addr),
                    Ok(Err(e @ crate::proxy_protocol::HeaderError::Malformed(_))) => {
                        tracing::warn!(balancer = %peer_addr, error = %e, "connection closed");
                        return;
                    }
                    // A connection the balancer closed before its header.
                    Ok(Err(e)) => {
                        tracing::debug!(balancer = %peer_addr, error = %e, "connection closed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(balancer = %peer_addr, "no PROXY header in time");
                        return;
                    }
                };
                let Some(_admitted) = gate.admit(client.ip()) else {
                    return;
                };
                connection(stream, client, transport, app).await;
            });
        }
    });
}

/// One admitted connection from `client`: its TLS handshake, if any, then its requests.
async fn connection(
    stream: tokio::net::TcpStream,
    client: std::net::SocketAddr,
    transport: Transport,
    app: Router,
) {
    let app = app.layer(axum::Extension(ConnectInfo(client)));
    match transport {
        Transport::Plain => serve(stream, app).await,
        Transport::Tls(acceptor) => {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            let Ok(Ok(tls)) = handshake else { return };
            // rustls verified the chain against our CA; this is who the peer is.
            let peer = PeerIdentity(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| flotilla_pki::certificate_identity_der(der)),
            );
            serve(tls, app.layer(axum::Extension(peer))).await;
        }
    }
}

/// One connection, HTTP/1.1 (see the module doc for why not HTTP/2).
async fn serve<Io>(io: Io, app: Router)
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let _ = http
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .await;
}
