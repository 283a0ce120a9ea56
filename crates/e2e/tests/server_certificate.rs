//! The server's TLS certificate renews while the server runs (issue 9): on a 24 s certificate,
//! the HTTPS device listener and the embedded broker's device and internal listeners show a new
//! one after two thirds of its life; a
//! device session opened before keeps working past the old certificate's expiry, and new
//! connections, which would fail against the expired one, succeed.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use flotilla_e2e::mqtt::{Outcome, connect, connect_device};
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Renewed at 16 s and 32 s: the checks after the first certificate's end (24 s) fall between.
const VALIDITY_SECS: u64 = 24;

/// The certificate a TLS handshake on `port` shows, checked against the CA (chain and
/// validity): `None` when the handshake fails. Presents `id`'s certificate, as a device does.
async fn served_certificate(port: u16, id: &DeviceIdentity) -> Option<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(id.ca_pem.as_bytes()) {
        roots.add(cert.ok()?).ok()?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .ok()?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).ok()?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .ok()?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").ok()?, tcp)
        .await
        .ok()?;
    let (_, conn) = tls.get_ref();
    Some(conn.peer_certificates()?.first()?.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_renews_while_running_and_sessions_outlive_the_old_one() {
    if flotilla_e2e::external_broker::embedded_only(
        "it checks the renewal on the embedded broker's two listeners together with the HTTPS one (an external broker presents a certificate of its own)",
    ) {
        return;
    }
    let validity = VALIDITY_SECS.to_string();
    let server = Server::start(&["--server-cert-validity", &validity])
        .await
        .unwrap();
    let jwt = server.admin("admin@x.io").await.unwrap();
    let early = server.enroll(&jwt, "early").await.unwrap();
    let https = server.device_port;
    let mqtt = server.mqtt_port;
    let internal = server.mqtt_internal_port;
    let first = served_certificate(https, &early).await.unwrap();
    assert_eq!(served_certificate(mqtt, &early).await.unwrap(), first);
    assert_eq!(served_certificate(internal, &early).await.unwrap(), first);
    // Its end, from the copy in the data dir (the one shown, until it is renewed).
    let pem = std::fs::read_to_string(server.data_dir().join("server.pem")).unwrap();
    assert_eq!(pem_der(&pem), first);
    let (_, not_after) = flotilla_pki::certificate_validity(&pem).unwrap();

    let mut session = connect_device(mqtt, &early).await.unwrap();
    session
        .publish(
            "devices/early/status",
            br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
        )
        .await
        .unwrap();

    // Both listeners take up the renewed certificate.
    for (what, port) in [
        ("HTTPS", https),
        ("MQTT", mqtt),
        ("internal MQTT", internal),
    ] {
        let (id, first) = (&early, &first);
        wait_for(
            &format!("a renewed certificate on {what}"),
            Duration::from_secs(VALIDITY_SECS * 2),
            || async move { served_certificate(port, id).await.filter(|c| c != first) },
        )
        .await
        .unwrap();
    }
    let renewed = served_certificate(https, &early).await.unwrap();
    assert_eq!(served_certificate(mqtt, &early).await.unwrap(), renewed);
    assert_eq!(served_certificate(internal, &early).await.unwrap(), renewed);

    // Past the first certificate's end: new connections still succeed, and the session
    // opened under it still carries messages.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    tokio::time::sleep(Duration::from_secs((not_after - now + 1).max(0) as u64)).await;
    let late = server.enroll(&jwt, "late").await.unwrap();
    let mut fresh = connect_device(mqtt, &late).await.unwrap();
    fresh
        .publish(
            "devices/late/status",
            br#"{"online":true,"fw":"1.0.0","hw":"esp32c3"}"#.to_vec(),
        )
        .await
        .unwrap();
    session
        .publish(
            "devices/early/status",
            br#"{"online":true,"fw":"1.0.1","hw":"esp32c3"}"#.to_vec(),
        )
        .await
        .unwrap();
    // The rebound internal listener takes the server's own kind of client, and still refuses
    // a device there.
    let ca = flotilla_pki::CertificateAuthority::load(&server.data_dir()).unwrap();
    let svc = ca.issue_service_certificate("probe").unwrap();
    let svc_auth = Some((svc.certificate_pem.as_str(), svc.private_key_pem.as_str()));
    let ca_pem = server.ca_pem();
    assert!(matches!(
        connect(internal, &ca_pem, svc_auth, "svc:probe").await,
        Outcome::Connected(_)
    ));
    let device_auth = Some((late.cert_pem.as_str(), late.key_pem.as_str()));
    let refused = connect(internal, &ca_pem, device_auth, "late").await;
    assert!(
        matches!(&refused, Outcome::Refused(why) if why.contains("NotAuthorized")),
        "{refused:?}"
    );
    for (id, fw) in [("early", "1.0.1"), ("late", "1.0.0")] {
        wait_for(
            &format!("{id} reporting {fw}"),
            Duration::from_secs(10),
            || async {
                let d = server.device(&jwt, id).await.ok()?;
                (d["online"] == true && d["firmwareVersion"] == fw).then_some(())
            },
        )
        .await
        .unwrap();
    }
    // The files in the data dir hold the certificate in use.
    let pem = std::fs::read_to_string(server.data_dir().join("server.pem")).unwrap();
    assert_ne!(pem_der(&pem), first);
}

fn pem_der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}
