//! Two server replicas on one PostgreSQL database behind one external Mosquitto (issue 8): 200
//! devices send numbered telemetry through the broker, which shares it between the replicas'
//! ingest sessions. Every message the broker acknowledged is stored exactly once, both replicas
//! ingested some, and a command created on one replica comes back answered whichever replica
//! ingested the device's reply. A replica SIGKILLed while devices publish, then restarted with
//! its replica id, loses nothing the broker acknowledged.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::mqtt::{Session, connect_device};
use flotilla_e2e::{Server, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};

const DEVICES: usize = 200;
const READINGS: u64 = 20;

async fn received(server: &Server, admin: &str) -> u64 {
    let (_, stats) = server
        .call("GET", "/api/admin/stats", Some(admin), None)
        .await
        .unwrap();
    stats["ingestLink"]["received"].as_u64().unwrap_or(0)
}

/// Publishes `readings` numbered readings as `device`, each after the PUBACK for the one
/// before; what the broker acknowledged.
async fn send_readings(
    mut session: Session,
    device: String,
    readings: u64,
) -> (Session, Vec<(String, u64)>) {
    let topic = format!("devices/{device}/telemetry");
    let mut acked = Vec::new();
    for seq in 0..readings {
        let reason = session
            .publish(&topic, format!(r#"{{"seq":{seq},"pot":7}}"#))
            .await
            .unwrap();
        assert_eq!(reason, PubAckReason::Success, "{device} seq {seq}");
        acked.push((device.clone(), seq));
    }
    (session, acked)
}

/// Replicas `a` (r1) and `b` (r2) on one PostgreSQL behind one Mosquitto, and `devices`
/// enrolled devices connected to it.
struct Rig {
    a: Server,
    b: Server,
    admin: String,
    ids: Vec<flotilla_e2e::DeviceIdentity>,
    sessions: Vec<Session>,
    _broker: (tempfile::TempDir, Mosquitto),
}

async fn rig(devices: usize) -> Rig {
    let mut a = Server::start_on_postgres(&[]).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let mut ids = Vec::new();
    for k in 0..devices {
        ids.push(a.enroll(&admin, &format!("dev-{k:03}")).await.unwrap());
    }
    let broker_dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start_for_replicas(broker_dir.path(), &a.data_dir(), &["r1", "r2"])
        .await
        .unwrap();
    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    a.set_args(&["--broker-url", &url, "--replica-id", "r1"]);
    a.restart().await.unwrap();
    let admin = a.login("admin@x.io", "admin-pass").await.unwrap();
    let b = a
        .start_replica(&["--broker-url", &url, "--replica-id", "r2"])
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for id in &ids {
        sessions.push(connect_device(mosquitto.device_port, id).await.unwrap());
    }
    Rig {
        a,
        b,
        admin,
        ids,
        sessions,
        _broker: (broker_dir, mosquitto),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_mosquitto_store_every_acknowledged_reading_once_and_answer_commands() {
    let Rig {
        a,
        b,
        admin,
        ids,
        sessions,
        // Bound, not `..`: the broker runs until the test ends.
        _broker,
    } = rig(DEVICES).await;
    let sends = sessions
        .into_iter()
        .zip(&ids)
        .map(|(s, id)| tokio::spawn(send_readings(s, id.device_id.clone(), READINGS)));
    let mut sent = BTreeSet::new();
    let mut sessions = Vec::new();
    for done in futures::future::join_all(sends).await {
        let (session, acked) = done.unwrap();
        sent.extend(acked);
        sessions.push(session);
    }
    assert_eq!(sent.len(), DEVICES * READINGS as usize);
    let stored = wait_for(
        "every acknowledged reading stored",
        Duration::from_secs(60),
        || async {
            let rows = a.database.stored_readings().await.ok()?;
            (rows.len() >= sent.len()).then_some(rows)
        },
    )
    .await
    .unwrap();
    let unique: BTreeSet<(String, u64)> = stored.iter().cloned().collect();
    assert_eq!(
        unique, sent,
        "stored differs from what the broker acknowledged"
    );
    assert_eq!(stored.len(), unique.len(), "a reading was stored twice");
    let (by_a, by_b) = (received(&a, &admin).await, received(&b, &admin).await);
    assert!(
        by_a > 0 && by_b > 0,
        "both replicas ingest: {by_a} and {by_b}"
    );

    // Commands created on replica A; the device's replies are shared between A's and B's
    // ingest, and each command reads back answered from A.
    let device = ids[0].device_id.clone();
    let session = &mut sessions[0];
    session
        .subscribe(&format!("devices/{device}/command"))
        .await
        .unwrap();
    let before_b = received(&b, &admin).await;
    let mut created = Vec::new();
    for _ in 0..6 {
        let (status, cmd) = a
            .call(
                "POST",
                &format!("/api/device/{device}/commands"),
                Some(&admin),
                Some(json!({"name": "ping"})),
            )
            .await
            .unwrap();
        assert_eq!(status, 202, "{cmd}");
        let (_, payload) = session.message(Duration::from_secs(10)).await.unwrap();
        let command: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(command["id"], cmd["id"]);
        let reply = json!({"id": command["id"], "status": "succeeded", "result": {"pong": true}});
        session
            .publish(&format!("devices/{device}/reply"), reply.to_string())
            .await
            .unwrap();
        created.push(cmd["id"].as_str().unwrap().to_string());
    }
    for id in &created {
        let path = format!("/api/device/{device}/commands/{id}");
        wait_for(
            "the reply read back on A",
            Duration::from_secs(15),
            || async {
                let (_, c) = a.call("GET", &path, Some(&admin), None).await.ok()?;
                (c["state"] == "succeeded").then_some(())
            },
        )
        .await
        .unwrap();
    }
    // Nothing but these replies went up meanwhile: B ingested some of them.
    assert!(
        received(&b, &admin).await > before_b,
        "no reply went through replica B"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sigkilled_while_devices_publish_and_restarted_loses_nothing_acknowledged() {
    let Rig {
        a,
        mut b,
        admin,
        ids,
        sessions,
        // Bound, not `..`: the broker runs until the test ends.
        _broker,
    } = rig(50).await;
    // The devices publish while B is killed and while it is away: B is killed once both
    // replicas have ingested some.
    let sends: Vec<_> = sessions
        .into_iter()
        .zip(&ids)
        .map(|(s, id)| tokio::spawn(send_readings(s, id.device_id.clone(), 400)))
        .collect();
    wait_for(
        "both replicas ingesting",
        Duration::from_secs(30),
        || async {
            let (ra, rb) = (received(&a, &admin).await, received(&b, &admin).await);
            (ra > 200 && rb > 200).then_some(())
        },
    )
    .await
    .unwrap();
    b.proc.kill_hard();
    let mut sent = BTreeSet::new();
    for done in futures::future::join_all(sends).await {
        sent.extend(done.unwrap().1);
    }
    assert_eq!(sent.len(), 50 * 400, "every publish was acknowledged");
    // Its session at the broker kept what was shared to it; back with the same id, it takes
    // that up.
    b.restart().await.unwrap();
    let stored = wait_for(
        "every acknowledged reading stored",
        Duration::from_secs(60),
        || async {
            let rows = a.database.stored_readings().await.ok()?;
            (rows.len() >= sent.len()).then_some(rows)
        },
    )
    .await
    .unwrap();
    let unique: BTreeSet<(String, u64)> = stored.iter().cloned().collect();
    assert_eq!(unique, sent);
    assert_eq!(stored.len(), unique.len());
}
