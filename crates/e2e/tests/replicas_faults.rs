//! Two server replicas on one PostgreSQL behind one Mosquitto while the infrastructure under
//! them fails (issue 8): PostgreSQL crashes (`pg_ctl -m immediate`, every connection cut, WAL
//! recovery at the next start) and comes back, then Mosquitto restarts, while 40 devices keep
//! publishing numbered readings and reconnect whenever their connection drops. Every reading
//! the broker acknowledged is stored, none twice, nothing is stored that was not sent, and one
//! replica leads afterwards.
//!
//! Its own binary, with its own PostgreSQL server: nothing else runs on that database.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::mqtt::{Session, connect_device};
use flotilla_e2e::postgres_cluster::PostgresCluster;
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

const DEVICES: usize = 40;

/// What one device sent: the seqs the broker acknowledged, and every seq it tried.
#[derive(Default)]
struct Sent {
    acked: BTreeSet<(String, u64)>,
    tried: BTreeSet<(String, u64)>,
    /// PUBACKs saying no subscriber took the message.
    refused_for_no_subscriber: u64,
}

/// Publishes readings 0, 1, … as `id` every 20 ms until `stop`, each after the PUBACK for the
/// one before. A publish whose connection fails is tried again on a new connection (it may
/// have reached the broker or not: tried, not acknowledged).
///
/// A PUBACK saying no subscriber took the message is allowed only while `restarting` (the
/// broker's own restart); at any other time it means the replicas left the broker without a
/// subscribed session, and the test fails.
async fn publish_until(
    port: u16,
    id: DeviceIdentity,
    stop: Arc<AtomicBool>,
    restarting: Arc<AtomicBool>,
) -> Sent {
    let topic = format!("devices/{}/telemetry", id.device_id);
    let mut sent = Sent::default();
    let mut session: Option<Session> = None;
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let live = match session.as_mut() {
            Some(live) => live,
            None => match connect_device(port, &id).await {
                Ok(fresh) => session.insert(fresh),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        sent.tried.insert((id.device_id.clone(), seq));
        match live
            .publish(&topic, format!(r#"{{"seq":{seq},"pot":7}}"#))
            .await
        {
            Ok(PubAckReason::Success) => {
                sent.acked.insert((id.device_id.clone(), seq));
                seq += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Mosquitto 2.0.11 restores its sessions' subscriptions only as each client
            // reconnects: in between it answers "no matching subscribers" and drops the
            // message. Not delivered, so a device sends it again (docs/protocol.md).
            Ok(PubAckReason::NoMatchingSubscribers) if restarting.load(Ordering::Relaxed) => {
                sent.refused_for_no_subscriber += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(other) => panic!("{} seq {seq}: {other:?}", id.device_id),
            Err(_) => session = None,
        }
    }
    sent
}

async fn received(server: &Server, admin: &str) -> Option<u64> {
    server.stats(admin).await?["ingestLink"]["received"].as_u64()
}

/// Waits until both replicas have taken `more` messages beyond `from` each.
async fn both_ingest(a: &Server, b: &Server, admin: &str, more: u64) {
    // Both answer first (neither does while the database is down).
    let from = wait_for(
        "both replicas answering",
        Duration::from_secs(60),
        || async { Some((received(a, admin).await?, received(b, admin).await?)) },
    )
    .await
    .unwrap();
    let r = wait_for(
        "both replicas ingesting",
        Duration::from_secs(60),
        || async {
            let (ra, rb) = (received(a, admin).await?, received(b, admin).await?);
            (ra >= from.0 + more && rb >= from.1 + more).then_some(())
        },
    )
    .await;
    r.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_acknowledged_while_postgres_crashes_and_mosquitto_restarts_are_all_stored_once() {
    let postgres = PostgresCluster::start().unwrap();
    let mut a = Server::start_on_url(&postgres.url(), &[]).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let mut ids = Vec::new();
    for k in 0..DEVICES {
        ids.push(a.enroll(&admin, &format!("dev-{k:03}")).await.unwrap());
    }
    let broker_dir = tempfile::tempdir().unwrap();
    let mut mosquitto =
        Mosquitto::start_for_replicas(broker_dir.path(), &a.data_dir(), &["r1", "r2"])
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

    let stop = Arc::new(AtomicBool::new(false));
    let restarting = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = ids
        .iter()
        .map(|id| {
            tokio::spawn(publish_until(
                mosquitto.device_port,
                id.clone(),
                stop.clone(),
                restarting.clone(),
            ))
        })
        .collect();
    both_ingest(&a, &b, &admin, 300).await;

    // The database crashes under both replicas while they commit, and recovers.
    postgres.crash_and_restart().unwrap();
    both_ingest(&a, &b, &admin, 300).await;

    // The broker restarts: every device and both replicas reconnect; what the broker had
    // acknowledged and not yet delivered is in its persistence file.
    restarting.store(true, Ordering::Relaxed);
    mosquitto.restart().await.unwrap();
    both_ingest(&a, &b, &admin, 300).await;
    restarting.store(false, Ordering::Relaxed);

    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut tried, mut no_subscriber) = (BTreeSet::new(), BTreeSet::new(), 0);
    for sender in futures::future::join_all(senders).await {
        let sent = sender.unwrap();
        acked.extend(sent.acked);
        tried.extend(sent.tried);
        no_subscriber += sent.refused_for_no_subscriber;
    }
    eprintln!(
        "{} readings acknowledged, {} tried, {no_subscriber} answered \"no matching subscribers\"",
        acked.len(),
        tried.len()
    );
    let stored = wait_for(
        "every acknowledged reading stored",
        Duration::from_secs(90),
        || async {
            let rows = a.database.stored_readings().await.ok()?;
            let have: BTreeSet<&(String, u64)> = rows.iter().collect();
            acked.iter().all(|r| have.contains(r)).then_some(rows)
        },
    )
    .await
    .unwrap();
    let unique: BTreeSet<(String, u64)> = stored.iter().cloned().collect();
    assert_eq!(stored.len(), unique.len(), "a reading was stored twice");
    assert!(
        unique.is_subset(&tried),
        "stored a reading nobody sent: {:?}",
        unique.difference(&tried).next()
    );
    assert!(
        acked.len() > 3 * 300,
        "the run was too short to mean anything: {} acknowledged",
        acked.len()
    );
    let one_leader = wait_for("one leader again", Duration::from_secs(30), || async {
        let (la, lb) = (a.leads(&admin).await?, b.leads(&admin).await?);
        (la != lb).then_some(())
    })
    .await;
    assert!(one_leader.is_ok(), "{one_leader:?}\n{}", postgres.log());
}
