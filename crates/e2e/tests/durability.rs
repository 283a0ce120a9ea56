//! Nothing a device saw acknowledged is lost: the server is killed with SIGKILL at random
//! moments while devices publish, and what was acknowledged is compared with what was stored.
//! Also: a message the database keeps refusing is dead-lettered while the next ones are
//! stored, and a database held locked by someone else delays acks instead of failing them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_e2e::mqtt::connect_device;
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use sqlx::Connection;

/// What one device saw in one connection: every seq it got PUBACK for, and where it stopped.
struct Run {
    acked: Vec<u64>,
    next: u64,
}

/// Publishes seq `from`, `from + 1`, ... one at a time, each after the previous PUBACK, until
/// the connection fails. A seq without PUBACK is sent again by the next run, as a device
/// would resend it.
async fn publish_until_cut(port: u16, id: &DeviceIdentity, from: u64) -> Run {
    let mut run = Run {
        acked: Vec::new(),
        next: from,
    };
    let Ok(mut session) = connect_device(port, id).await else {
        return run;
    };
    let topic = format!("devices/{}/telemetry", id.device_id);
    loop {
        let payload = format!(r#"{{"seq":{},"pot":{}}}"#, run.next, run.next % 4096);
        match session.publish(&topic, payload).await {
            Ok(PubAckReason::Success) => {
                run.acked.push(run.next);
                run.next += 1;
            }
            _ => return run,
        }
    }
}

/// Every stored seq of a device, straight from the database (duplicates included).
async fn stored_seqs(server: &Server, device: &str) -> anyhow::Result<Vec<u64>> {
    Ok(server
        .database
        .stored_readings()
        .await?
        .into_iter()
        .filter(|(d, _)| d == device)
        .map(|(_, seq)| seq)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_acknowledged_before_a_sigkill_is_stored_exactly_once() -> anyhow::Result<()>
{
    if flotilla_e2e::external_broker::embedded_only(
        "a server SIGKILL cuts no device off an external broker; external_broker.rs and replicas_external_broker.rs kill servers behind Mosquitto",
    ) {
        return Ok(());
    }
    // CI runs a bounded count; the benchmark in docs/benchmarks.md runs more.
    let cycles: usize = std::env::var("FLOTILLA_SIGKILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    // Devices publish as fast as acks come back: no publish rate limit here.
    let mut server = Server::start(&[
        "--device-publish-rate",
        "1000000",
        "--device-publish-burst",
        "1000000",
    ])
    .await?;
    let jwt = server.user("sigkill@example.com").await?;
    let mut devices = Vec::new();
    for k in 0..4 {
        devices.push(server.enroll(&jwt, &format!("kill-{k}")).await?);
    }
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    let mut acked: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut rng = rand::rng();
    for cycle in 0..cycles {
        let port = server.mqtt_port;
        let runs: Vec<_> = devices
            .iter()
            .map(|d| {
                let (d, from) = (d.clone(), next.get(&d.device_id).copied().unwrap_or(0));
                tokio::spawn(async move {
                    (d.device_id.clone(), publish_until_cut(port, &d, from).await)
                })
            })
            .collect();
        let after = Duration::from_millis(rng.random_range(150..900));
        tokio::time::sleep(after).await;
        server.sigkill_and_restart().await?;
        for run in runs {
            let (device, run) = run.await?;
            acked.entry(device.clone()).or_default().extend(&run.acked);
            next.insert(device, run.next);
        }
        eprintln!(
            "cycle {cycle}: killed after {after:?}; acknowledged so far {}",
            acked.values().map(BTreeSet::len).sum::<usize>()
        );
    }
    let mut total = 0;
    for d in &devices {
        let stored = stored_seqs(&server, &d.device_id).await?;
        let unique: BTreeSet<u64> = stored.iter().copied().collect();
        // SQLite's (device, seq) key makes this hold by construction; it is checked so that a
        // backend without that key (PostgreSQL, issue 8) is caught.
        assert_eq!(
            unique.len(),
            stored.len(),
            "{}: a seq stored twice",
            d.device_id
        );
        let want = acked.get(&d.device_id).cloned().unwrap_or_default();
        let lost: Vec<_> = want.difference(&unique).collect();
        assert!(
            lost.is_empty(),
            "{}: acknowledged but lost: {lost:?}",
            d.device_id
        );
        let sent = next.get(&d.device_id).copied().unwrap_or(0);
        assert!(
            unique.iter().all(|s| *s <= sent),
            "{}: stored a seq never sent",
            d.device_id
        );
        total += want.len();
    }
    assert!(total > 0, "no message was acknowledged at all");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_message_is_dead_lettered_while_the_next_ones_are_stored() -> anyhow::Result<()>
{
    let server = Server::start(&[]).await?;
    let jwt = server.user("poison@example.com").await?;
    let admin = server.admin("poison-admin@example.com").await?;
    let ids = [
        server.enroll(&jwt, "p1").await?,
        server.enroll(&jwt, "p2").await?,
        server.enroll(&jwt, "p3").await?,
    ];
    // Fault injection from outside: the database refuses one reading, forever.
    server.database.poison_reading("p1", 13).await?;

    // Three devices at once, so the poisoned reading shares a batch with others.
    let mut tasks = Vec::new();
    for id in ids.iter().cloned() {
        let port = server.mqtt_port;
        tasks.push(tokio::spawn(async move {
            let mut s = connect_device(port, &id).await?;
            let topic = format!("devices/{}/telemetry", id.device_id);
            for seq in 10..20 {
                let r = s.publish(&topic, format!(r#"{{"seq":{seq}}}"#)).await?;
                anyhow::ensure!(r == PubAckReason::Success, "seq {seq}: {r:?}");
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // Behind the embedded broker all is stored by the last ack; an external broker acks first.
    for id in &ids {
        let want: BTreeSet<u64> = (10..20)
            .filter(|s| !(id.device_id == "p1" && *s == 13))
            .collect();
        let stored = wait_for("the readings stored", Duration::from_secs(10), || async {
            let stored: BTreeSet<u64> = stored_seqs(&server, &id.device_id)
                .await
                .ok()?
                .into_iter()
                .collect();
            (stored.len() >= want.len()).then_some(stored)
        })
        .await?;
        assert_eq!(stored, want, "{}", id.device_id);
    }
    let (s, dead) = server
        .call("GET", "/api/admin/dead-letters", Some(&admin), None)
        .await?;
    assert_eq!(s, 200);
    let dead = dead.as_array().cloned().unwrap_or_default();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["topic"], "devices/p1/telemetry");
    assert!(
        dead[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("poisoned reading")),
        "{dead:?}"
    );
    // Ingest goes on after it.
    let mut s = connect_device(server.mqtt_port, &ids[0]).await?;
    s.publish("devices/p1/telemetry", r#"{"seq":99}"#).await?;
    wait_for("seq 99 stored", Duration::from_secs(5), || async {
        let seqs = stored_seqs(&server, "p1").await.ok()?;
        seqs.contains(&99).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_locked_by_another_writer_delays_acks_and_fails_none() -> anyhow::Result<()> {
    let server = Server::start(&[]).await?;
    let jwt = server.user("locked@example.com").await?;
    let id = server.enroll(&jwt, "locked-dev").await?;
    let mut s = connect_device(server.mqtt_port, &id).await?;

    let mut db = server.database.lock_writes().await?;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        sqlx::query("COMMIT").execute(&mut db).await?;
        let released = std::time::Instant::now();
        db.close().await?;
        anyhow::Ok(released)
    });
    // Published while the lock is held: the PUBACK waits for the commit, and comes.
    let mut acked = Vec::new();
    for seq in 0..3 {
        let r = s
            .publish(
                "devices/locked-dev/telemetry",
                format!(r#"{{"seq":{seq}}}"#),
            )
            .await?;
        assert_eq!(r, PubAckReason::Success);
        acked.push(std::time::Instant::now());
    }
    let external = flotilla_e2e::external_broker::enabled();
    if external {
        // An external broker acknowledges at once: nothing is stored while the lock holds.
        let stored = stored_seqs(&server, "locked-dev").await?;
        assert!(!release.is_finished(), "the lock went before the check");
        assert!(stored.is_empty(), "stored while the database was locked");
    }
    let released = release.await??;
    assert!(
        external || acked[0] >= released,
        "acknowledged while the database was locked"
    );
    wait_for("all three stored", Duration::from_secs(10), || async {
        (stored_seqs(&server, "locked-dev").await.ok()?.len() == 3).then_some(())
    })
    .await?;
    let admin = server.admin("locked-admin@example.com").await?;
    let (_, dead) = server
        .call("GET", "/api/admin/dead-letters", Some(&admin), None)
        .await?;
    assert_eq!(dead.as_array().map(Vec::len), Some(0), "{dead}");
    Ok(())
}
