//! Scale mode's ingest through an external broker (a real Mosquitto 2.0 with mutual TLS,
//! started here): devices publish to the broker, the server's ingest link takes their
//! messages from a persistent shared-subscription session and acknowledges each only after
//! it is committed. Faults: the server SIGKILLed holding messages it took but had not
//! committed (the database held locked), the broker restarted while commits are held up (so
//! they end after their connection closed), and a device that claims the ingest client's id
//! and another device's topic.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::mqtt::{Outcome, Session, connect, connect_device, leave_persistent_session};
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use serde_json::Value;
use sqlx::Connection;

const DEVICES: usize = 5;

/// Publishes `seqs` as one device, each after the broker's PUBACK for the one before.
async fn publish(
    session: &mut Session,
    device: &str,
    seqs: std::ops::Range<u64>,
) -> Vec<(String, u64)> {
    let topic = format!("devices/{device}/telemetry");
    let mut acked = Vec::new();
    for seq in seqs {
        let reason = session
            .publish(&topic, format!(r#"{{"seq":{seq},"pot":7}}"#))
            .await
            .expect("publish");
        assert_eq!(reason, PubAckReason::Success, "{device} seq {seq}");
        acked.push((device.to_string(), seq));
    }
    acked
}

async fn stored(server: &Server) -> anyhow::Result<Vec<(String, u64)>> {
    server.database.stored_readings().await
}

async fn link_stats(server: &Server, admin: &str) -> anyhow::Result<Value> {
    let (status, body) = server
        .call("GET", "/api/admin/stats", Some(admin), None)
        .await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    Ok(body["ingestLink"].clone())
}

/// A counter of the ingest link, 0 when absent.
async fn link_count(server: &Server, admin: &str, name: &str) -> u64 {
    link_stats(server, admin)
        .await
        .ok()
        .and_then(|s| s[name].as_u64())
        .unwrap_or(0)
}

async fn connect_all(port: u16, ids: &[DeviceIdentity]) -> Vec<Session> {
    let mut sessions = Vec::new();
    for id in ids {
        sessions.push(
            connect_device(port, id)
                .await
                .expect("device connects to mosquitto"),
        );
    }
    sessions
}

/// Holds the database's write lock until dropped or committed: the server's commits wait.
async fn lock_database(server: &Server) -> anyhow::Result<sqlx::AnyConnection> {
    server.database.lock_writes().await
}

async fn wait_stored(server: &Server, sent: &BTreeSet<(String, u64)>) -> anyhow::Result<()> {
    wait_for(
        "every acknowledged message stored",
        Duration::from_secs(30),
        || {
            let n = sent.len();
            async move { (stored(server).await.ok()?.len() >= n).then_some(()) }
        },
    )
    .await
}

async fn wait_count(server: &Server, admin: &str, name: &str, at_least: u64) -> anyhow::Result<()> {
    wait_for(name, Duration::from_secs(20), || async move {
        (link_count(server, admin, name).await >= at_least).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_through_mosquitto_stores_every_acknowledged_message_across_a_server_sigkill_and_a_broker_restart()
 {
    // The embedded start makes the CA and the server certificate the broker presents.
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let mut ids = Vec::new();
    for k in 0..DEVICES {
        ids.push(server.enroll(&admin, &format!("dev-{k}")).await.unwrap());
    }
    let broker_dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(broker_dir.path(), &server.data_dir(), "r1")
        .await
        .unwrap();
    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    server.set_args(&["--broker-url", &url, "--replica-id", "r1"]);
    server.restart().await.unwrap();

    let mut sent = BTreeSet::new();
    let mut sessions = connect_all(mosquitto.device_port, &ids).await;
    for (session, id) in sessions.iter_mut().zip(&ids) {
        sent.extend(publish(session, &id.device_id, 0..40).await);
    }
    wait_stored(&server, &sent).await.unwrap();
    let batch = (DEVICES * 20) as u64;

    // 1. The server dies holding messages it took from the broker but could not commit (the
    //    database is locked): acked before the commit, they would be gone.
    let received = link_count(&server, &admin, "received").await;
    let locker = lock_database(&server).await.unwrap();
    for (session, id) in sessions.iter_mut().zip(&ids) {
        sent.extend(publish(session, &id.device_id, 40..60).await);
    }
    wait_count(&server, &admin, "received", received + batch)
        .await
        .unwrap();
    server.proc.kill_hard();
    locker.close().await.unwrap();
    // While the server is down the broker queues for its session.
    for (session, id) in sessions.iter_mut().zip(&ids) {
        sent.extend(publish(session, &id.device_id, 1000..1010).await);
    }
    server.restart().await.unwrap();
    wait_stored(&server, &sent).await.unwrap();

    // 2. The link's connection closes while commits wait: their acks must not go out on the
    //    next connection, and the broker must deliver those messages again.
    let before = link_count(&server, &admin, "received").await;
    let mut locker = lock_database(&server).await.unwrap();
    for (session, id) in sessions.iter_mut().zip(&ids) {
        sent.extend(publish(session, &id.device_id, 60..80).await);
    }
    wait_count(&server, &admin, "received", before + batch)
        .await
        .unwrap();
    let received = link_count(&server, &admin, "received").await;
    drop(sessions);
    let resumed = link_count(&server, &admin, "resumed").await;
    mosquitto.restart().await.unwrap();
    wait_count(&server, &admin, "resumed", resumed + 1)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    wait_stored(&server, &sent).await.unwrap();
    // Delivered again after the broker's restart: the first copies were never acknowledged.
    wait_count(&server, &admin, "received", received + batch)
        .await
        .unwrap();
    assert!(
        link_count(&server, &admin, "staleAcks").await >= batch,
        "{:?}",
        link_stats(&server, &admin).await
    );

    // 3. A hostile device claims the ingest client's id while the broker queues messages
    //    for the ingest session (the server is down): taking the session over with a clean
    //    start would wipe them. It also publishes on another device's topic. Neither
    //    changes what is stored.
    let mut sessions = connect_all(mosquitto.device_port, &ids[1..]).await;
    server.proc.kill_hard();
    for (session, id) in sessions.iter_mut().zip(&ids[1..]) {
        sent.extend(publish(session, &id.device_id, 80..90).await);
    }
    let thief = &ids[0];
    match connect(
        mosquitto.device_port,
        &thief.ca_pem,
        Some((&thief.cert_pem, &thief.key_pem)),
        "svc:server-ingest-r1",
    )
    .await
    {
        Outcome::Connected(mut s) => {
            // Mosquitto answers PUBACK either way (MQTT 3-style silent drop on ACL denial).
            let _ = s
                .publish("devices/dev-1/telemetry", r#"{"seq":9999,"pot":1}"#)
                .await;
        }
        Outcome::Refused(why) => panic!("a device with its own id may connect: {why}"),
    }
    server.restart().await.unwrap();
    wait_stored(&server, &sent).await.unwrap();

    // 4. A blocked device stays connected to the broker (the server cannot disconnect it
    //    there), but nothing it sends is stored.
    let (status, body) = server
        .call("POST", "/api/admin/device/dev-2/block", Some(&admin), None)
        .await
        .unwrap();
    assert_eq!((status, body["blocked"].as_bool()), (200, Some(true)));
    let _ = publish(&mut sessions[1], "dev-2", 500..505).await;
    assert_eq!(ids[2].device_id, "dev-2");
    wait_count(&server, &admin, "blocked", 5).await.unwrap();

    // 5. Downward: a command reaches its device through the broker (as the downlink's own
    //    user), and a device subscribed to another's command topic gets nothing.
    assert_eq!(
        (ids[1].device_id.as_str(), ids[3].device_id.as_str()),
        ("dev-1", "dev-3")
    );
    assert!(matches!(
        sessions[2]
            .subscribe("devices/dev-3/command")
            .await
            .unwrap(),
        SubscribeReasonCode::Success(_)
    ));
    // Mosquitto's acl_file grants this and filters each delivery instead.
    let _ = sessions[0]
        .subscribe("devices/dev-3/command")
        .await
        .unwrap();
    let (status, body) = server
        .call(
            "POST",
            "/api/device/dev-3/commands",
            Some(&admin),
            Some(serde_json::json!({"name": "ping"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (topic, payload) = sessions[2].message(Duration::from_secs(10)).await.unwrap();
    assert_eq!(topic, "devices/dev-3/command");
    assert!(String::from_utf8_lossy(&payload).contains("ping"));
    // Sent in the same instant as dev-3's copy; a second is long after it. The wait must
    // end by timing out, on a connection still open.
    let other = sessions[0].message(Duration::from_secs(1)).await;
    assert!(
        other
            .as_ref()
            .is_err_and(|e| e.to_string().contains("timed out")),
        "{other:?}"
    );

    let rows = stored(&server).await.unwrap();
    let unique: BTreeSet<_> = rows.iter().cloned().collect();
    assert_eq!(
        unique, sent,
        "stored differs from what the broker acknowledged"
    );
    assert_eq!(rows.len(), unique.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_certificates_rotate_while_the_server_runs() {
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let id = server.enroll(&admin, "dev-0").await.unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(broker_dir.path(), &server.data_dir(), "r1")
        .await
        .unwrap();
    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    // The links' certificates live 20 s: renewed after ~13 s, the first ones gone after 20.
    server.set_args(&[
        "--broker-url",
        &url,
        "--replica-id",
        "r1",
        "--service-cert-validity",
        "20",
    ]);
    server.restart().await.unwrap();
    let mut device = connect_device(mosquitto.device_port, &id).await.unwrap();
    let mut sent: BTreeSet<_> = publish(&mut device, "dev-0", 0..5)
        .await
        .into_iter()
        .collect();
    wait_stored(&server, &sent).await.unwrap();
    let sessions = link_count(&server, &admin, "sessions").await;

    // Past the first certificates' end, the broker restarts: the links must reconnect, and
    // Mosquitto accepts only an unexpired certificate.
    tokio::time::sleep(Duration::from_secs(24)).await;
    drop(device);
    mosquitto.restart().await.unwrap();
    wait_count(&server, &admin, "sessions", sessions + 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", mosquitto.log()));
    let mut device = connect_device(mosquitto.device_port, &id).await.unwrap();
    sent.extend(publish(&mut device, "dev-0", 5..10).await);
    wait_stored(&server, &sent).await.unwrap();
    // The downlink too: a command reaches the device.
    device.subscribe("devices/dev-0/command").await.unwrap();
    let (status, body) = server
        .call(
            "POST",
            "/api/device/dev-0/commands",
            Some(&admin),
            Some(serde_json::json!({"name": "ping"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (topic, _) = device.message(Duration::from_secs(20)).await.unwrap();
    assert_eq!(topic, "devices/dev-0/command");
    assert!(
        server.log().contains("renewed service certificate"),
        "the renewal is logged"
    );
}

/// A server of an earlier version left its persistent ingest session subscribed in the fixed
/// group `flotilla`, which any device may join on Mosquitto. Resuming that session, the server
/// leaves the group: what the broker queued for the old session while no server ran is stored,
/// and each later reading reaches the server once, through its own group, and none through
/// the old one it would share with the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_server_leaves_the_fixed_group_its_resumed_session_held() {
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let thief = server.enroll(&admin, "dev-0").await.unwrap();
    let sender = server.enroll(&admin, "dev-1").await.unwrap();
    let broker_dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(broker_dir.path(), &server.data_dir(), "r1")
        .await
        .unwrap();
    let ca = flotilla_pki::CertificateAuthority::load_or_create(&server.data_dir()).unwrap();
    let svc = ca.issue_service_certificate("server-ingest-r1").unwrap();
    let retired = "$share/flotilla/devices/+/telemetry";
    leave_persistent_session(
        mosquitto.service_port,
        &server.ca_pem(),
        (&svc.certificate_pem, &svc.private_key_pem),
        "svc:server-ingest-r1",
        retired,
    )
    .await
    .unwrap();
    // Queued for the old session, the group's only member.
    let mut session = connect_device(mosquitto.device_port, &sender)
        .await
        .unwrap();
    let mut sent: BTreeSet<_> = publish(&mut session, "dev-1", 0..20)
        .await
        .into_iter()
        .collect();
    let mut waiting = connect_device(mosquitto.device_port, &thief).await.unwrap();
    assert!(matches!(
        waiting.subscribe(retired).await.unwrap(),
        SubscribeReasonCode::Success(_)
    ));

    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    server.set_args(&["--broker-url", &url, "--replica-id", "r1"]);
    server.restart().await.unwrap();
    // Every upward channel's retired filter is confirmed gone (one of them was there).
    wait_count(&server, &admin, "retiredUnsubscribed", 5)
        .await
        .unwrap();
    assert_eq!(link_count(&server, &admin, "resumed").await, 1);
    wait_stored(&server, &sent).await.unwrap();
    let received = link_count(&server, &admin, "received").await;
    sent.extend(publish(&mut session, "dev-1", 20..40).await);
    wait_stored(&server, &sent).await.unwrap();
    // Still in the old group, about half would arrive a second time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(link_count(&server, &admin, "received").await - received, 20);
    drop(waiting);
}
