//! The HTTPS listener devices talk to (`--device-addr`): `/sign-csr`, `/renew`, `/ca.pem` and firmware
//! downloads. Client certificates are requested and verified against our CA when
//! offered, but not required, because a device has none before `/sign-csr`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use flotilla_pki::KeyedCertificate;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app::AppState;
use crate::conn_limits::ConnectionGate;
use crate::listener::Transport;
use crate::rotation::Identity;
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

/// The server certificate each handshake shows: the identity's current one, so a renewed
/// certificate is in use from the handshake after it was issued (open connections keep theirs).
#[derive(Debug)]
struct CurrentCertificate(std::sync::RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

fn certified_key(cert: &KeyedCertificate) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.certificate_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("server certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(cert.private_key_pem.as_bytes()).context("server key")?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider)?))
}

/// The device listener's TLS set-up: client certificates checked against `ca_pem` when
/// offered, the server certificate taken from `identity` as it is renewed.
pub fn tls_acceptor(ca_pem: &str, mut identity: Identity) -> anyhow::Result<TlsAcceptor> {
    let current = Arc::new(CurrentCertificate(std::sync::RwLock::new(certified_key(
        &identity.borrow_and_update(),
    )?)));
    let updating = current.clone();
    tokio::spawn(async move {
        while identity.changed().await.is_ok() {
            let renewed = certified_key(&identity.borrow_and_update());
            match renewed {
                Ok(key) => {
                    if let Ok(mut slot) = updating.0.write() {
                        *slot = key;
                    }
                    tracing::info!("device listener: renewed server certificate in use");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "device listener: renewed server certificate unusable; keeping the current one")
                }
            }
        }
    });
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA certificate")?)?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(current);
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
    proxies: crate::proxy_protocol::ProxyPeers,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding device listener on {addr}"))?;
    let bound = listener.local_addr()?;
    crate::listener::spawn(listener, Transport::Tls(acceptor), app, gate, proxies);
    Ok(bound)
}
