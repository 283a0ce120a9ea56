//! The HTTPS listener devices talk to (`--device-addr`): `/sign-csr`, `/renew`, `/ca.pem` and firmware
//! downloads. Client certificates are requested and verified against our CA when
//! offered, but not required, because a device has none before `/sign-csr`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app::AppState;
use crate::conn_limits::ConnectionGate;
use crate::listener::Transport;
use crate::routes;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(routes::sign_csr::router())
        .merge(routes::renew::router())
        .merge(routes::firmware::router())
        .route("/ca.pem", axum::routing::get(routes::meta::ca_pem))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            crate::listener::BODY_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn(crate::error::refuse_nul_in_url))
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
    // HTTP/1.1 only: crate::listener's module doc says why.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

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
    crate::listener::spawn(listener, Transport::Tls(acceptor), app, gate);
    Ok(bound)
}
