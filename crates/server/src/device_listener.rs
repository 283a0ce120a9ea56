//! The HTTPS listener devices talk to (`--device-addr`): `/sign-csr`, `/ca.pem` and firmware
//! downloads. Client certificates are requested and verified against our CA when
//! offered, but not required, because a device has none before `/sign-csr`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app::AppState;
use crate::conn_limits::ConnectionGate;
use crate::routes;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(routes::sign_csr::router())
        .merge(routes::firmware::router())
        .route("/ca.pem", axum::routing::get(routes::meta::ca_pem))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::map_response(crate::error::json_errors))
        .with_state(state)
}

/// The verified client certificate of a connection, `(serial, CN)`, if one was presented;
/// added to every request on that connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub Option<(String, String)>);

pub fn tls_acceptor(ca_pem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<TlsAcceptor> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA certificate")?)?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("server key")?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds and serves; returns the bound address.
/// How long a connection may take to finish its TLS handshake, and to send a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds and serves; returns the bound address. `gate` caps open connections in total and
/// per source address; a connection over a cap is closed at once.
pub async fn serve(
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    gate: ConnectionGate,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding device listener on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, peer_addr) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "device listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(admitted) = gate.admit(peer_addr.ip()) else {
                // Over a cap: closing now costs the socket nothing more.
                drop(stream);
                continue;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let _admitted = admitted;
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
                let app = app
                    .layer(axum::Extension(peer))
                    .layer(axum::Extension(axum::extract::ConnectInfo(peer_addr)));
                let service = TowerToHyperService::new(app);
                // The protocol comes from ALPN, not from reading the first bytes: the auto
                // builder's read of the HTTP/2 preface has no deadline, so a client that
                // finished TLS and went silent would hold the connection for ever.
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
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
                let _ = http.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    Ok(bound)
}
