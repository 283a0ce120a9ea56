//! An admin revokes a device's certificate or blocks the device; both brokers must then refuse
//! it. The embedded broker disconnects it at once and its gate refuses the serial, across a
//! restart. An external Mosquitto 2.0 (started here with `crlfile`) learns it through
//! `flotilla-server broker-sync` (CRL + ACL deny + SIGHUP, and a session takeover that closes
//! what was open): the revoked device's session is closed and its reconnect fails the TLS
//! handshake; a blocked device's session is closed and its publishes refused until it is
//! unblocked; provisioned again, the device connects with its new certificate while the old
//! one stays refused; a device re-provisioned while its old session is open has that session
//! closed; a device nobody touched publishes throughout. With two replicas behind that broker,
//! a revocation made through either reaches the broker.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use flotilla_e2e::external_broker::HarnessBroker;
use flotilla_e2e::mqtt::{Session, connect_device};
use flotilla_e2e::tls_resumption::ResumingClient;
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::Value;

/// How long broker-sync (one read a second here) and the broker's reload may take.
const SYNC_WAIT: Duration = Duration::from_secs(20);

struct Device {
    id: DeviceIdentity,
    session: Session,
    seq: u64,
}

impl Device {
    async fn connect(port: u16, id: DeviceIdentity) -> Device {
        let session = connect_device(port, &id).await.unwrap();
        Device {
            id,
            session,
            seq: 0,
        }
    }

    /// One numbered reading; the broker's answer and the number it carried.
    async fn publish(&mut self) -> (PubAckReason, u64) {
        self.seq += 1;
        let topic = format!("devices/{}/telemetry", self.id.device_id);
        let reason = self
            .session
            .publish(&topic, format!(r#"{{"seq":{},"pot":1}}"#, self.seq))
            .await
            .unwrap();
        (reason, self.seq)
    }

    /// Publishes until the broker answers `wanted` (broker-sync runs on its own clock);
    /// the number of the first message it answered so.
    async fn publish_until(&mut self, wanted: PubAckReason) -> u64 {
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let (reason, seq) = self.publish().await;
            if reason == wanted {
                return seq;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still {reason:?}, waited for {wanted:?}",
                self.id.device_id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn admin_post(server: &Server, admin: &str, path: &str) -> Value {
    let (status, body) = server.call("POST", path, Some(admin), None).await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn stored_seqs(server: &Server, device: &str) -> Vec<u64> {
    let readings = server.database.stored_readings().await.unwrap();
    readings
        .into_iter()
        .filter(|(d, _)| d == device)
        .map(|(_, seq)| seq)
        .collect()
}

async fn wait_stored(server: &Server, device: &str, seq: u64) {
    wait_for("reading stored", Duration::from_secs(20), || async move {
        stored_seqs(server, device)
            .await
            .contains(&seq)
            .then_some(())
    })
    .await
    .unwrap();
}

/// Whether the embedded broker's access decision refuses this identity (CONNACK "not
/// authorized": not a timeout, a TLS error or a crash).
async fn refused_by_the_gate(port: u16, id: &DeviceIdentity) -> bool {
    refused(port, id)
        .await
        .is_some_and(|why| why.contains("NotAuthorized"))
}

/// The audit log holds exactly one revocation, of `device`.
async fn assert_revoked_once_in_the_audit(server: &Server, admin: &str, device: &str) {
    let entries = server.audit(admin, "admin.device.revoke").await.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["target"], device);
}

/// The open `session` of `id` is closed by the broker on `port` within [`SYNC_WAIT`], and a
/// reconnect fails the TLS handshake on a revoked certificate.
async fn closed_and_refused_as_revoked(session: &mut Session, port: u16, id: &DeviceIdentity) {
    assert!(
        session.closed_within(SYNC_WAIT).await,
        "{}: the open session was not closed",
        id.device_id
    );
    let why = refused(port, id).await.expect("refused on reconnect");
    assert!(why.to_lowercase().contains("revoked"), "{why}");
}

/// Whether a connection with this identity is refused at the TLS handshake (or CONNECT).
async fn refused(port: u16, id: &DeviceIdentity) -> Option<String> {
    connect_device(port, id)
        .await
        .err()
        .map(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_disconnected_by_the_embedded_broker_and_refused_after_a_restart() {
    if flotilla_e2e::external_broker::embedded_only(
        "the embedded broker's disconnect and gate; the Mosquitto tests below are its external counterpart",
    ) {
        return;
    }
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let id = server.enroll(&admin, "dev-r").await.unwrap();
    let other = server.enroll(&admin, "dev-o").await.unwrap();
    // A TLS session ticket from before the revocation (taken before the device's own session,
    // which this connection would otherwise replace).
    let tickets = ResumingClient::new(&id).unwrap();
    let ticketed = tickets.connect(server.mqtt_port).await.unwrap();
    assert!(ticketed.admitted(), "{ticketed:?}");
    let mut device = Device::connect(server.mqtt_port, id.clone()).await;
    let mut bystander = Device::connect(server.mqtt_port, other.clone()).await;
    assert_eq!(device.publish().await.0, PubAckReason::Success);

    let body = admin_post(&server, &admin, "/api/admin/device/dev-r/revoke").await;
    assert_eq!(body["revoked"], true);
    assert!(
        device.session.closed_within(Duration::from_secs(10)).await,
        "the live session of a revoked device is closed"
    );
    assert!(refused_by_the_gate(server.mqtt_port, &id).await);
    // The gate checks the certificate's serial at CONNECT, whether the handshake resumed a
    // session or not.
    let resumed = tickets.connect(server.mqtt_port).await.unwrap();
    assert!(!resumed.admitted(), "{resumed:?}");
    let (status, body) = server
        .call("POST", "/api/admin/device/dev-r/revoke", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!(status, 409, "nothing left to revoke: {body}");
    let (status, _) = server
        .call(
            "POST",
            "/api/admin/device/nobody/revoke",
            Some(&admin),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    let operator = server.user("op@x.io").await.unwrap();
    let (status, _) = server
        .call(
            "POST",
            "/api/admin/device/dev-o/revoke",
            Some(&operator),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "only an admin revokes");
    assert_eq!(bystander.publish().await.0, PubAckReason::Success);

    let device_row = server.device(&admin, "dev-r").await.unwrap();
    assert_eq!(device_row["provisioned"], false);
    assert_eq!(device_row["online"], false);
    assert_revoked_once_in_the_audit(&server, &admin, "dev-r").await;

    server.restart().await.unwrap();
    assert!(
        refused_by_the_gate(server.mqtt_port, &id).await,
        "still refused after a restart"
    );
    Device::connect(server.mqtt_port, other).await;
    // Provisioned again, it connects with its new certificate; the old one stays refused.
    let renewed = server.enroll(&admin, "dev-r").await.unwrap();
    let mut device = Device::connect(server.mqtt_port, renewed).await;
    assert_eq!(device.publish().await.0, PubAckReason::Success);
    assert!(refused_by_the_gate(server.mqtt_port, &id).await);
}

/// A Mosquitto on the ACL and CRL that broker-sync writes from `server`'s database, with a
/// certificate from the server's CA and broker-sync running (one pass a second, SIGHUP to
/// the broker on a change); it admits replicas r1 to r3.
async fn synced_broker(server: &Server) -> HarnessBroker {
    HarnessBroker::start(server.dir.path(), server.env())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_blocking_reach_an_external_mosquitto_through_broker_sync() {
    // The embedded start makes the CA and the certificate the broker presents.
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let ids: Vec<DeviceIdentity> =
        futures::future::join_all(["dev-a", "dev-b", "dev-c"].map(|d| server.enroll(&admin, d)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let broker = synced_broker(&server).await;
    let mosquitto = broker.mosquitto();
    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    server.set_args(&["--broker-url", &url, "--replica-id", "r1"]);
    server.restart().await.unwrap();
    let port = mosquitto.device_port;
    // dev-b's certificate holds a TLS session ticket from before its revocation, and the
    // broker resumes sessions: a resumed handshake verifies no certificate.
    let tickets = ResumingClient::new(&ids[1]).unwrap();
    let first = tickets.connect(port).await.unwrap();
    assert!(first.admitted() && !first.resumed, "{first:?}");
    let again = tickets.connect(port).await.unwrap();
    assert!(
        again.admitted() && again.resumed,
        "Mosquitto resumes: {again:?}"
    );

    let mut a = Device::connect(port, ids[0].clone()).await;
    let mut b = Device::connect(port, ids[1].clone()).await;
    let mut c = Device::connect(port, ids[2].clone()).await;
    for d in [&mut a, &mut b, &mut c] {
        let (reason, seq) = d.publish().await;
        assert_eq!(reason, PubAckReason::Success);
        wait_stored(&server, &d.id.device_id, seq).await;
    }

    admin_post(&server, &admin, "/api/admin/device/dev-b/revoke").await;
    let blocked = admin_post(&server, &admin, "/api/admin/device/dev-a/block").await;
    assert_eq!(blocked["blocked"], true);
    // broker-sync takes both open sessions over, which closes them ...
    for d in [&mut a, &mut b] {
        assert!(
            d.session.closed_within(SYNC_WAIT).await,
            "{}: the open session was not closed",
            d.id.device_id
        );
    }
    // ... while the untouched device's stays and publishes.
    let (reason, c_seq) = c.publish().await;
    assert_eq!(
        reason,
        PubAckReason::Success,
        "an untouched device publishes"
    );
    wait_stored(&server, "dev-c", c_seq).await;
    // The revoked certificate fails the handshake. The blocked device's passes it, and every
    // publish is refused by the ACL.
    let why = refused(port, &ids[1])
        .await
        .expect("revoked certificate refused");
    assert!(why.to_lowercase().contains("revoked"), "{why}");
    let numbered = a.seq;
    let mut a = Device::connect(port, ids[0].clone()).await;
    a.seq = numbered;
    let (reason, a_refused) = a.publish().await;
    assert_eq!(reason, PubAckReason::NotAuthorized);

    // Unblocked: it publishes again.
    let unblocked = admin_post(&server, &admin, "/api/admin/device/dev-a/block").await;
    assert_eq!(unblocked["blocked"], false);
    let seq = a.publish_until(PubAckReason::Success).await;
    wait_stored(&server, "dev-a", seq).await;
    assert!(
        !stored_seqs(&server, "dev-a").await.contains(&a_refused),
        "a refused publish never reached ingest"
    );

    // Provisioned again: the new certificate connects and publishes once the deny is gone;
    // the revoked one stays in the CRL.
    let renewed = server.enroll(&admin, "dev-b").await.unwrap();
    let mut b2 = Device::connect(port, renewed).await;
    let seq = b2.publish_until(PubAckReason::Success).await;
    wait_stored(&server, "dev-b", seq).await;
    assert!(refused(port, &ids[1]).await.is_some());
    // Only the CRL stands between the old certificate and the broker now (the ACL admits
    // dev-b again), and its ticket is not honoured: broker-sync's SIGHUP made the broker a
    // new TLS context, so the handshake is a full one and the CRL refuses it.
    let resumed = tickets.connect(port).await.unwrap();
    assert!(
        !resumed.admitted() && !resumed.resumed,
        "the revoked certificate resumed its session: {resumed:?}"
    );

    // Re-provisioned while its old session is open (a stolen certificate still connected):
    // that session is closed before the new certificate is used, and the old certificate is
    // refused from then on.
    let replaced = server.enroll(&admin, "dev-c").await.unwrap();
    closed_and_refused_as_revoked(&mut c.session, port, &ids[2]).await;
    let mut c2 = Device::connect(port, replaced).await;
    let seq = c2.publish_until(PubAckReason::Success).await;
    wait_stored(&server, "dev-c", seq).await;
    let acl = std::fs::read_to_string(broker.acl_file()).unwrap();
    assert!(
        !acl.contains("user dev-"),
        "no device denied any more:\n{acl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_revoked_through_one_of_two_replicas_behind_mosquitto_stops_and_is_refused() {
    let mut a = Server::start_on_postgres(&[]).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let ids: Vec<DeviceIdentity> =
        futures::future::join_all(["dev-a", "dev-b"].map(|d| a.enroll(&admin, d)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let broker = synced_broker(&a).await;
    let url = format!("mqtts://localhost:{}", broker.mosquitto().service_port);
    a.set_args(&["--broker-url", &url, "--replica-id", "r1"]);
    a.restart().await.unwrap();
    let b = a
        .start_replica(&["--broker-url", &url, "--replica-id", "r2"])
        .await
        .unwrap();
    let admin_b = b.login("admin@x.io", "admin-pass").await.unwrap();
    let port = broker.device_port();
    let mut kept = Device::connect(port, ids[0].clone()).await;
    let mut revoked = Device::connect(port, ids[1].clone()).await;
    for d in [&mut kept, &mut revoked] {
        let (reason, seq) = d.publish().await;
        assert_eq!(reason, PubAckReason::Success);
        wait_stored(&a, &d.id.device_id, seq).await;
    }

    // Revoked through replica B; replica A and broker-sync learn it from the database.
    admin_post(&b, &admin_b, "/api/admin/device/dev-b/revoke").await;
    closed_and_refused_as_revoked(&mut revoked.session, port, &ids[1]).await;
    // The device row says so through either replica.
    let device_row = a.device(&admin_b, "dev-b").await.unwrap();
    assert_eq!(device_row["provisioned"], false);
    // The other device's session stays and is stored through either replica.
    let (reason, seq) = kept.publish().await;
    assert_eq!(reason, PubAckReason::Success);
    wait_stored(&a, "dev-a", seq).await;
    assert_revoked_once_in_the_audit(&a, &admin, "dev-b").await;
}
