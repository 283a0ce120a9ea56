//! The accept loop of the HTTP listeners (the device listener over TLS, the user API in plain
//! HTTP): connection caps in total and per source address ([`ConnectionGate`]), a deadline for
//! the TLS handshake and one for each request's headers, and the peer's address (and, over
//! TLS, its verified certificate identity) added to every request.

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::conn_limits::ConnectionGate;
use crate::device_listener::PeerIdentity;

/// How long a connection may take to finish its TLS handshake, and to send a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection speaks below HTTP.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(TlsAcceptor),
}

/// Accepts on `listener` until the process ends.
pub fn spawn(listener: TcpListener, transport: Transport, app: Router, gate: ConnectionGate) {
    tokio::spawn(async move {
        loop {
            let (stream, peer_addr) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(admitted) = gate.admit(peer_addr.ip()) else {
                // Over a cap: closing now costs the socket nothing more.
                drop(stream);
                continue;
            };
            let (transport, app) = (transport.clone(), app.clone());
            tokio::spawn(async move {
                let _admitted = admitted;
                let app = app.layer(axum::Extension(ConnectInfo(peer_addr)));
                match transport {
                    Transport::Plain => serve(stream, app, false).await,
                    Transport::Tls(acceptor) => {
                        let handshake =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        let Ok(Ok(tls)) = handshake else { return };
                        // rustls verified the chain against our CA; this is who the peer is.
                        let peer = PeerIdentity(
                            tls.get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|der| flotilla_pki::certificate_identity_der(der)),
                        );
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                        serve(tls, app.layer(axum::Extension(peer)), h2).await;
                    }
                }
            });
        }
    });
}

/// One connection. The protocol is decided before a byte is read (ALPN over TLS, HTTP/1.1 in
/// plain): hyper's automatic detection reads the HTTP/2 preface without a deadline, so a
/// client that connects and goes silent would hold the connection for ever.
async fn serve<Io>(io: Io, app: Router, h2: bool)
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HEADER_TIMEOUT)
        .keep_alive_timeout(HEADER_TIMEOUT)
        .max_concurrent_streams(32);
    let http = if h2 {
        http.http2_only()
    } else {
        http.http1_only()
    };
    let _ = http
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        .await;
}
