//! A device's TLS client that keeps its session tickets from one connection to the next, as
//! rustls does within one `ClientConfig`. A resumed TLS 1.3 handshake does not verify the
//! client's certificate again: a broker that resumed a session made before a revocation
//! would let the revoked certificate in without looking at its CRL. Tests use this client to
//! show a broker resumes sessions at all, and refuses to resume one once the certificate
//! it was made with is revoked.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::DeviceIdentity;

/// One device's TLS client state: its certificate and the tickets brokers gave it.
pub struct ResumingClient {
    config: Arc<ClientConfig>,
    client_id: String,
}

/// What one connection attempt got.
#[derive(Debug)]
pub struct Attempt {
    /// The broker accepted the ticket: no certificate was verified for this connection.
    pub resumed: bool,
    /// The CONNACK's return code (0: accepted), or why none came.
    pub connack: Result<u8, String>,
}

impl Attempt {
    pub fn admitted(&self) -> bool {
        matches!(self.connack, Ok(0))
    }
}

impl ResumingClient {
    pub fn new(id: &DeviceIdentity) -> Result<ResumingClient> {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(id.ca_pem.as_bytes()) {
            roots.add(ca.context("CA certificate")?)?;
        }
        let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("device certificate")?;
        let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).context("device key")?;
        // The default resumption store keeps the tickets for the life of the config.
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(ResumingClient {
            config: Arc::new(config),
            client_id: id.device_id.clone(),
        })
    }

    /// A TLS handshake with `localhost:port` (offering a ticket if it holds one), then an
    /// MQTT 3.1.1 CONNECT; the CONNACK's code, or the error that came instead. The
    /// connection is closed after the CONNACK, which also brings in new tickets.
    pub async fn connect(&self, port: u16) -> Result<Attempt> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = ServerName::try_from("localhost")?;
        let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .context("TLS handshake timed out")??;
        let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        let connack = async {
            tls.write_all(&connect_packet(&self.client_id)).await?;
            let mut ack = [0u8; 4];
            tls.read_exact(&mut ack).await?;
            // A second read gives the tickets sent after the handshake time to arrive.
            let mut more = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(200), tls.read(&mut more)).await;
            anyhow::ensure!(ack[0] == 0x20 && ack[1] == 2, "not a CONNACK: {ack:02x?}");
            Ok(ack[3])
        };
        let connack = tokio::time::timeout(Duration::from_secs(10), connack)
            .await
            .map_err(|_| "no CONNACK within 10 s".to_string())
            .and_then(|r| r.map_err(|e: anyhow::Error| format!("{e:#}")));
        let _ = tls.shutdown().await;
        Ok(Attempt { resumed, connack })
    }
}

/// MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s, `client_id`, no credentials (the
/// broker takes the identity from the certificate).
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    assert!(body.len() < 128, "one length byte");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}
