//! How the server's own MQTT clients (the downlink, the ingest link) reach the broker and
//! prove who they are: a `svc:` certificate from the server's CA, renewed while the server
//! runs ([`crate::rotation`]); each client takes the new one at its next connection.

use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::rotation::Identity;

/// Where the broker is and the service certificate to show it.
#[derive(Clone)]
pub struct ServiceLink {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
    pub identity: Identity,
}

impl std::fmt::Debug for ServiceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceLink")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ServiceLink {
    pub fn options(&mut self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_clean_start(true);
        o.set_max_packet_size(Some(64 * 1024));
        // Without TCP_NODELAY, Nagle and delayed ACKs stall small MQTT packets by ~40 ms.
        let mut net = o.network_options();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        // rumqttc otherwise sizes its in-flight table for 65,535 publishes (~10 MB).
        o.set_outgoing_inflight_upper_limit(256);
        o.set_transport(self.transport());
        o
    }

    /// The TLS set-up with the current certificate, marked as seen.
    fn transport(&mut self) -> Transport {
        let cert = self.identity.borrow_and_update();
        Transport::tls_with_config(TlsConfiguration::Simple {
            ca: self.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: Some((
                cert.certificate_pem.clone().into_bytes(),
                cert.private_key_pem.clone().into_bytes(),
            )),
        })
    }

    /// If the certificate was renewed since `options` was made, puts the new one in, for the
    /// next connection (the open one stays: a broker checks a certificate at the handshake
    /// only, and dropping it could lose what is in flight). Whether it did.
    pub fn refresh(&mut self, options: &mut MqttOptions) -> bool {
        if !self.identity.has_changed().unwrap_or(false) {
            return false;
        }
        options.set_transport(self.transport());
        true
    }
}
