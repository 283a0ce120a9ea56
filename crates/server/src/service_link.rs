//! How the server's own MQTT client (the downlink) reaches the broker and proves who it is: a
//! `svc:` certificate from the server's CA, on the broker's internal listener.

use std::time::Duration;

use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

/// Where the broker is and the service certificate to show it.
#[derive(Clone)]
pub struct ServiceLink {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
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
    pub fn options(&self, client_id: &str) -> MqttOptions {
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
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: self.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: Some((
                self.cert_pem.clone().into_bytes(),
                self.key_pem.clone().into_bytes(),
            )),
        }));
        o
    }
}
