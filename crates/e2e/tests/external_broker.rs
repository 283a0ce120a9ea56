//! Scale mode's ingest through an external broker (a real Mosquitto 2.0 with mutual TLS,
//! started here): devices publish to the broker, the server's ingest link takes their
//! messages from a persistent shared-subscription session and acknowledges each only after
//! it is committed. Faults: the server SIGKILLed mid-stream, and the broker restarted while
//! commits are held up, so commits end after their connection closed.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::mqtt::{Session, connect_device};
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
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
    let mut db = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}?mode=ro",
        server.database_path().display()
    ))
    .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT device_id, seq FROM telemetry")
        .fetch_all(&mut db)
        .await?;
    Ok(rows.into_iter().map(|(d, s)| (d, s as u64)).collect())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_through_mosquitto_stores_every_acknowledged_message_once_across_a_server_sigkill_and_a_broker_restart()
 {
    // The embedded start makes the CA and the server certificate the broker presents.
    let mut server = Server::start(&[]).await.unwrap();
    let admin = server.admin("admin@x.io").await.unwrap();
    let mut ids = Vec::new();
    for k in 0..DEVICES {
        ids.push(server.enroll(&admin, &format!("dev-{k}")).await.unwrap());
    }
    let broker_dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(broker_dir.path(), &server.data_dir())
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
    // The server dies with messages queued or in flight to its session; the broker keeps them.
    server.sigkill_and_restart().await.unwrap();
    for (session, id) in sessions.iter_mut().zip(&ids) {
        sent.extend(publish(session, &id.device_id, 40..80).await);
    }
    wait_for("everything so far stored", Duration::from_secs(30), || {
        let server = &server;
        let n = sent.len();
        async move { (stored(server).await.ok()?.len() == n).then_some(()) }
    })
    .await
    .unwrap();
    let received_before = link_count(&server, &admin, "received").await;
    let resumed_before = link_count(&server, &admin, "resumed").await;

    // Commits held up by a lock on the database; the broker gets more and hands it on.
    let mut locker =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", server.database_path().display()))
            .await
            .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    for (session, id) in sessions.iter_mut().zip(&ids) {
        sent.extend(publish(session, &id.device_id, 80..100).await);
    }
    let in_flight = (DEVICES * 20) as u64;
    wait_for(
        "the link holds the new messages",
        Duration::from_secs(20),
        || {
            let (server, admin) = (&server, &admin);
            async move {
                (link_count(server, admin, "received").await >= received_before + in_flight)
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    // The link's connection closes while those commits wait; their acks must not go out on
    // the next connection, and the broker must deliver the messages again.
    drop(sessions);
    mosquitto.restart().await.unwrap();
    wait_for(
        "the link resumed its session",
        Duration::from_secs(20),
        || {
            let (server, admin) = (&server, &admin);
            async move {
                (link_count(server, admin, "resumed").await > resumed_before).then_some(())
            }
        },
    )
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    wait_for("everything stored", Duration::from_secs(30), || {
        let server = &server;
        let n = sent.len();
        async move { (stored(server).await.ok()?.len() == n).then_some(()) }
    })
    .await
    .unwrap();

    let rows = stored(&server).await.unwrap();
    let unique: BTreeSet<_> = rows.iter().cloned().collect();
    assert_eq!(rows.len(), unique.len(), "a message stored twice");
    assert_eq!(
        unique, sent,
        "stored differs from what the broker acknowledged"
    );
    let after = link_stats(&server, &admin).await.unwrap();
    assert!(
        after["staleAcks"].as_u64().unwrap() >= in_flight,
        "acks of the closed connection were not dropped: {after}"
    );
    assert!(after["resumed"].as_u64().unwrap() >= 1, "{after}");
    assert!(!mosquitto.log().contains("Denied"), "{}", mosquitto.log());
}
