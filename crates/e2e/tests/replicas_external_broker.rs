//! Two server replicas on one PostgreSQL database behind one external Mosquitto (issue 8): 200
//! devices send numbered telemetry through the broker, which shares it between the replicas'
//! ingest sessions. Every message the broker acknowledged is stored exactly once, both replicas
//! ingested some, and a command created on one replica comes back answered whichever replica
//! ingested the device's reply. A replica SIGKILLed while devices publish loses nothing the
//! broker acknowledged, whether it is restarted with its replica id or left dead (the other
//! replica drains its session once its ingest lease lapsed).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::mqtt::{Session, connect_device};
use flotilla_e2e::{Server, wait_for};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};

const DEVICES: usize = 200;
const READINGS: u64 = 20;

async fn received(server: &Server, admin: &str) -> u64 {
    link_count(server, admin, "received").await
}

/// Messages the replica took from the broker and has not acknowledged (not committed yet).
async fn holding(server: &Server, admin: &str) -> u64 {
    let stats = server.stats(admin).await;
    let count = |name: &str| {
        stats
            .as_ref()
            .and_then(|s| s["ingestLink"][name].as_u64())
            .unwrap_or(0)
    };
    count("received").saturating_sub(count("acked"))
}

/// A counter of the server's ingest link (0 while it does not answer).
async fn link_count(server: &Server, admin: &str, name: &str) -> u64 {
    match server.stats(admin).await {
        Some(stats) => stats["ingestLink"][name].as_u64().unwrap_or(0),
        None => 0,
    }
}

/// Publishes the readings numbered `seqs` as `device`, each after the PUBACK for the one
/// before; what the broker acknowledged.
async fn send_readings(
    session: Session,
    device: String,
    seqs: std::ops::Range<u64>,
) -> (Session, Vec<(String, u64)>) {
    publish_readings(session, device, seqs, || false).await
}

/// Publishes numbered readings from seq 0 until `stop` is raised: a test that stalls or kills
/// a replica mid-stream needs the stream to outlast that step however loaded the machine is
/// (a fixed count can be sent before the step begins).
async fn send_readings_until(
    session: Session,
    device: String,
    stop: Arc<AtomicBool>,
) -> (Session, Vec<(String, u64)>) {
    publish_readings(session, device, 0.., move || stop.load(Ordering::Relaxed)).await
}

async fn publish_readings(
    mut session: Session,
    device: String,
    seqs: impl Iterator<Item = u64>,
    stopped: impl Fn() -> bool,
) -> (Session, Vec<(String, u64)>) {
    let topic = format!("devices/{device}/telemetry");
    let mut acked = Vec::new();
    for seq in seqs {
        if stopped() {
            break;
        }
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

async fn rig(devices: usize, extra: &[&str]) -> Rig {
    let mut a = Server::start_on_postgres(extra).await.unwrap();
    let admin = a.admin("admin@x.io").await.unwrap();
    let mut ids = Vec::new();
    for k in 0..devices {
        ids.push(a.enroll(&admin, &format!("dev-{k:03}")).await.unwrap());
    }
    let broker_dir = tempfile::tempdir().unwrap();
    // r3 is allowed too, for a test that starts a third replica.
    let mosquitto =
        Mosquitto::start_for_replicas(broker_dir.path(), &a.data_dir(), &["r1", "r2", "r3"])
            .await
            .unwrap();
    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    let args = |replica: &'static str| {
        let mut args = vec!["--broker-url", url.as_str(), "--replica-id", replica];
        args.extend_from_slice(extra);
        args
    };
    a.set_args(&args("r1"));
    a.restart().await.unwrap();
    let admin = a.login("admin@x.io", "admin-pass").await.unwrap();
    let b = a.start_replica(&args("r2")).await.unwrap();
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
    } = rig(DEVICES, &[]).await;
    let sends = sessions
        .into_iter()
        .zip(&ids)
        .map(|(s, id)| tokio::spawn(send_readings(s, id.device_id.clone(), 0..READINGS)));
    let mut sent = BTreeSet::new();
    let mut sessions = Vec::new();
    for done in futures::future::join_all(sends).await {
        let (session, acked) = done.unwrap();
        sent.extend(acked);
        sessions.push(session);
    }
    assert_eq!(sent.len(), DEVICES * READINGS as usize);
    assert_stored_exactly(&a, &sent).await;
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
    let mut answered = Vec::new();
    let mut again = Vec::new();
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
        // Delivery is at least once: an earlier command may arrive again (the device answers
        // it without running it), once at most here, where each is answered within a second
        // (the resender waits 10 s); anything else is a fault.
        let command = loop {
            let (_, payload) = session.message(Duration::from_secs(10)).await.unwrap();
            let command: Value = serde_json::from_slice(&payload).unwrap();
            if command["id"] == cmd["id"] {
                break command;
            }
            assert!(
                answered.contains(&command["id"]),
                "unknown command {command}"
            );
            assert!(
                !again.contains(&command["id"]),
                "{} delivered a third time",
                command["id"]
            );
            again.push(command["id"].clone());
        };
        answered.push(command["id"].clone());
        let reply = json!({"id": command["id"], "status": "succeeded", "result": {"pong": true}});
        // A request on A waits for the command while the device answers; whichever replica
        // ingests the reply, the wait ends with it.
        let path = format!(
            "/api/device/{device}/commands/{}?wait=20",
            command["id"].as_str().unwrap()
        );
        let (waited, published) = tokio::join!(a.call("GET", &path, Some(&admin), None), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            session
                .publish(&format!("devices/{device}/reply"), reply.to_string())
                .await
        });
        published.unwrap();
        let (status, waited) = waited.unwrap();
        assert_eq!(status, 200, "{waited}");
        assert_eq!(waited["state"], "succeeded", "{waited}");
    }
    // Nothing but these replies went up meanwhile: B ingested some of them.
    assert!(
        received(&b, &admin).await > before_b,
        "no reply went through replica B"
    );
    // The waits ended on the database's notices (a reply committed by B wakes A), or on a
    // re-read when a notice came late.
    let (_, stats) = a
        .call("GET", "/api/admin/stats", Some(&admin), None)
        .await
        .unwrap();
    let waits = &stats["commandWaits"];
    assert_eq!(
        waits["woken"].as_u64().unwrap() + waits["reread"].as_u64().unwrap(),
        6,
        "{waits}"
    );
    assert!(waits["woken"].as_u64().unwrap() >= 1, "{waits}");
}

/// A second server started with a replica id a running one uses (which would share its
/// ingest session at the broker) is refused, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_with_a_running_replicas_id_is_refused_at_start() {
    let Rig { a, _broker, .. } = rig(0, &[]).await;
    let url = a
        .extra_args()
        .windows(2)
        .find(|w| w[0] == "--broker-url")
        .map(|w| w[1].clone())
        .unwrap();
    let started = std::time::Instant::now();
    let err = a
        .start_replica(&["--broker-url", &url, "--replica-id", "r1"])
        .await
        .err()
        .expect("a second r1 started");
    let err = format!("{err:#}");
    assert!(
        err.contains("replica id \"r1\" is in use by another running server"),
        "{err}"
    );
    // Refused after one renewal interval, not after waiting out the lease.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sigkilled_while_devices_publish_and_restarted_loses_nothing_acknowledged() {
    replica_b_sigkilled_while_devices_publish(Then::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_sigkilled_while_devices_publish_and_left_dead_has_its_share_stored_by_the_other()
{
    replica_b_sigkilled_while_devices_publish(Then::LeaveDead).await;
}

enum Then {
    /// B comes back with its replica id.
    Restart,
    /// B never returns: A drains its session once B's ingest lease lapsed.
    LeaveDead,
}

async fn replica_b_sigkilled_while_devices_publish(then: Then) {
    let Rig {
        a,
        b,
        admin,
        ids,
        sessions,
        // Bound, not `..`: the broker runs until the test ends.
        _broker,
    } = rig(DEVICES, &[]).await;
    // The devices publish while B is killed and while it is away: B is killed once both
    // replicas have ingested some.
    let stop = Arc::new(AtomicBool::new(false));
    let sends: Vec<_> = sessions
        .into_iter()
        .zip(&ids)
        .map(|(s, id)| tokio::spawn(send_readings_until(s, id.device_id.clone(), stop.clone())))
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
    // The replica killed is the one that does not lead (the leader's death is tested with a
    // rollout below): from here on `a` leads and `b` follows.
    let b_leads = wait_for("one leader", Duration::from_secs(30), || async {
        let (la, lb) = (a.leads(&admin).await?, b.leads(&admin).await?);
        (la != lb).then_some(lb)
    })
    .await
    .unwrap();
    let (a, mut b) = if b_leads { (b, a) } else { (a, b) };
    if let Then::LeaveDead = then {
        // B dies holding messages it took and could not commit (the database stalls their
        // inserts): they stay unacknowledged in its session, which only a drain can store.
        // (Counted as taken and not acknowledged: how many more arrive after the stall
        // depends on when it is sampled against the link's window, on a loaded machine.)
        let stall = a.database.stall_telemetry().await.unwrap();
        wait_for(
            "B taking messages it cannot commit",
            Duration::from_secs(30),
            || async { (holding(&b, &admin).await >= 50).then_some(()) },
        )
        .await
        .unwrap();
        b.proc.kill_hard();
        drop(stall);
    } else {
        b.proc.kill_hard();
    }
    // The devices go on while B is away, then stop.
    let before = received(&a, &admin).await;
    wait_for(
        "A ingesting while B is away",
        Duration::from_secs(30),
        || async { (received(&a, &admin).await >= before + 200).then_some(()) },
    )
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut sent = BTreeSet::new();
    let mut sessions = Vec::new();
    for done in futures::future::join_all(sends).await {
        let (session, acked) = done.unwrap();
        sent.extend(acked);
        sessions.push(session);
    }
    assert!(sent.len() > 400, "{} publishes acknowledged", sent.len());
    match then {
        // Its session at the broker kept what was shared to it; back with the same id, it
        // takes that up (or finds it drained by A, if A was quicker).
        Then::Restart => b.restart().await.unwrap(),
        Then::LeaveDead => {}
    }
    assert_stored_exactly(&a, &sent).await;
    // One leader: A while B stays dead, one of the two once B is back.
    wait_for("one leader", Duration::from_secs(30), || async {
        let la = a.leads(&admin).await?;
        match then {
            Then::LeaveDead => la.then_some(()),
            Then::Restart => (la != b.leads(&admin).await?).then_some(()),
        }
    })
    .await
    .unwrap();
    if let Then::LeaveDead = then {
        let adopted = wait_for("A drained B's session", Duration::from_secs(30), || async {
            let (_, stats) = a
                .call("GET", "/api/admin/stats", Some(&admin), None)
                .await
                .ok()?;
            (stats["ingestLink"]["adopted"] != 0).then_some(stats)
        })
        .await
        .unwrap();
        assert_eq!(adopted["ingestLink"]["adopted"], 1, "{adopted}");
        // Every message drained was acknowledged to the broker, none left in B's session.
        assert_eq!(adopted["ingestLink"]["unsentAcks"], 0, "{adopted}");
        // B's session no longer takes a share: what the devices send now is all stored.
        // Above any seq the stream reached.
        const AFTER: u64 = 1 << 32;
        let more = sessions
            .into_iter()
            .zip(&ids)
            .map(|(s, id)| tokio::spawn(send_readings(s, id.device_id.clone(), AFTER..AFTER + 20)));
        for done in futures::future::join_all(more).await {
            sent.extend(done.unwrap().1);
        }
        assert_stored_exactly(&a, &sent).await;
    }
}

/// Waits for `sent` to be stored, then checks nothing else and nothing twice was.
async fn assert_stored_exactly(server: &Server, sent: &BTreeSet<(String, u64)>) {
    let stored = wait_for(
        "every acknowledged reading stored",
        Duration::from_secs(60),
        || async {
            let rows = server.database.stored_readings().await.ok()?;
            (rows.len() >= sent.len()).then_some(rows)
        },
    )
    .await
    .unwrap();
    let unique: BTreeSet<(String, u64)> = stored.iter().cloned().collect();
    assert_eq!(
        &unique, sent,
        "stored differs from what the broker acknowledged"
    );
    assert_eq!(stored.len(), unique.len(), "a reading was stored twice");
}

/// A scripted device on the new firmware's side of an update: reports `fw` 1.0.0, and answers
/// each offer with SUCCESS after `delay` (and reports the offered version). Every offer id it
/// received, in order, once `stop` is set.
async fn answer_offers(
    mut session: Session,
    device: String,
    delay: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    session
        .subscribe(&format!("devices/{device}/ota"))
        .await
        .unwrap();
    let status = |fw: &str| json!({"online": true, "fw": fw, "hw": "esp32c3"}).to_string();
    session
        .publish(&format!("devices/{device}/status"), status("1.0.0"))
        .await
        .unwrap();
    let mut offers = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok((_, payload)) = session.message(Duration::from_millis(300)).await else {
            continue;
        };
        let offer: Value = serde_json::from_slice(&payload).unwrap();
        // The version is in the signed manifest, a JSON document of its own.
        let manifest: Option<Value> = offer["manifest"]["manifest"]
            .as_str()
            .and_then(|m| serde_json::from_str(m).ok());
        let version = manifest.as_ref().and_then(|m| m["version"].as_str());
        let (Some(id), Some(version)) = (offer["id"].as_str(), version) else {
            continue; // a cancel, or anything else that is no offer
        };
        offers.push(id.to_string());
        tokio::time::sleep(delay).await;
        let done = json!({"status": "SUCCESS", "id": id, "version": version});
        session
            .publish(&format!("devices/{device}/ota/status"), done.to_string())
            .await
            .unwrap();
        session
            .publish(&format!("devices/{device}/status"), status(version))
            .await
            .unwrap();
    }
    offers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_sigkilled_mid_rollout_is_replaced_and_every_device_gets_its_offer_once() {
    leader_fails_mid_rollout(LeaderFailure::Killed).await;
}

/// The leader stalls (SIGSTOP) past its lease, perhaps inside a sweep's transaction, and
/// wakes (SIGCONT) after the survivor took over and moved the rollout on: whatever it had
/// decided before it froze is refused, and it stays a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_mid_rollout_is_replaced_and_writes_nothing_when_it_wakes() {
    leader_fails_mid_rollout(LeaderFailure::Frozen).await;
}

enum LeaderFailure {
    Killed,
    Frozen,
}

async fn leader_fails_mid_rollout(failure: LeaderFailure) {
    use flotilla_e2e::release_kit::Kit;
    const FLEET: usize = 30;
    let tmp = tempfile::tempdir().unwrap();
    let kit = Kit::new(tmp.path());
    let key = kit.public_key();
    let Rig {
        mut a,
        mut b,
        admin,
        ids,
        sessions,
        _broker,
    } = rig(FLEET, &["--release-key", &key]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let devices: Vec<_> = sessions
        .into_iter()
        .zip(&ids)
        .map(|(s, id)| {
            tokio::spawn(answer_offers(
                s,
                id.device_id.clone(),
                Duration::from_millis(1500),
                stop.clone(),
            ))
        })
        .collect();
    let a_leads = wait_for("one leader", Duration::from_secs(20), || async {
        let (la, lb) = (a.leads(&admin).await?, b.leads(&admin).await?);
        (la != lb).then_some(la)
    })
    .await
    .unwrap();
    let (leader, survivor) = if a_leads {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let cli = flotilla_e2e::Cli::new(survivor, &tmp.path().join("session.json"));
    let login = cli.run(&["login", "--email", "admin@x.io", "--password", "admin-pass"]);
    assert!(login.status.success());
    let image = kit.release("1.1.0", "normal");
    cli.json(&["release", "publish", image.to_str().unwrap()]);
    let created = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--all",
        "--phases",
        "10,40,100",
        "--wait-timeout",
        "60",
    ]);
    let id = created["id"].as_str().unwrap().to_string();
    // Mid-rollout: some devices updated, most not yet offered.
    wait_for("the first phase done", Duration::from_secs(60), || async {
        let r = survivor.rollout(&admin, &id).await?;
        (r["progress"]["succeeded"].as_u64()? >= 3).then_some(())
    })
    .await
    .unwrap();
    let failed_at = std::time::Instant::now();
    match failure {
        LeaderFailure::Killed => leader.proc.kill_hard(),
        LeaderFailure::Frozen => leader.proc.freeze(),
    }
    wait_for(
        "the survivor takes the lease",
        Duration::from_secs(30),
        || async { survivor.leads(&admin).await?.then_some(()) },
    )
    .await
    .unwrap();
    let took_over = failed_at.elapsed();
    if let LeaderFailure::Frozen = failure {
        // The survivor moves the rollout on before the old leader wakes with what it
        // decided under its old epoch.
        let succeeded = survivor.rollout(&admin, &id).await.unwrap()["progress"]["succeeded"]
            .as_u64()
            .unwrap();
        wait_for(
            "the survivor moving the rollout on",
            Duration::from_secs(60),
            || async {
                let r = survivor.rollout(&admin, &id).await?;
                (r["progress"]["succeeded"].as_u64()? > succeeded).then_some(())
            },
        )
        .await
        .unwrap();
        leader.proc.resume();
    }
    let done = wait_for(
        "the rollout completes",
        Duration::from_secs(120),
        || async {
            let r = survivor.rollout(&admin, &id).await?;
            (r["state"] == "completed").then_some(r)
        },
    )
    .await
    .unwrap();
    assert_eq!(done["progress"]["succeeded"], FLEET, "{done}");
    if let LeaderFailure::Frozen = failure {
        // Awake, it follows once its next renewal finds the lease taken (until then its
        // sweeps are refused by the fence).
        wait_for(
            "the woken leader follows",
            Duration::from_secs(10),
            || async { (!leader.leads(&admin).await?).then_some(()) },
        )
        .await
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for (offers, id) in futures::future::join_all(devices)
        .await
        .into_iter()
        .zip(&ids)
    {
        let offers = offers.unwrap();
        // One update id each. An offer may arrive twice: a new leader sends the in-flight
        // offers again (the old one may have died between its commit and its publish), and
        // a device ignores an offer it is already working on.
        let distinct: BTreeSet<&String> = offers.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{} got offers {offers:?}: one update each",
            id.device_id
        );
    }
    // Each device has one update: nothing offered twice, by the old leader or the new.
    for id in &ids {
        let (_, history) = survivor
            .call(
                "GET",
                &format!("/api/ota/{}/history", id.device_id),
                Some(&admin),
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            history["updates"].as_array().map(Vec::len),
            Some(1),
            "{}: {history}",
            id.device_id
        );
    }
    // Each transition recorded once: the old leader's tenure ended before the new one's
    // began (a decision of the old one saved after the takeover would repeat a phase).
    let transitions: Vec<String> = survivor
        .rollout_transitions(&admin, &id)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, words)| words)
        .collect();
    assert_eq!(
        transitions,
        [
            "phase 1 running",
            "phase 2 running",
            "phase 3 running",
            "completed"
        ],
        "each transition once"
    );
    assert_no_write_under_an_old_epoch(survivor, &admin, &id).await;
    // The lease's TTL (10 s) plus the survivor's renewal interval (3.3 s) bound the
    // takeover; 2 s more for the requests that notice it on a loaded machine.
    assert!(took_over < Duration::from_secs(16), "took {took_over:?}");
}

/// The rollout's transitions name the replica and lease epoch that saved them
/// (`system:rollouts@<holder>#<epoch>`): in the audit log's order their epochs never go
/// back, each holder has one epoch, the first transition was the old leader's and the last
/// the survivor's.
async fn assert_no_write_under_an_old_epoch(survivor: &Server, admin: &str, rollout: &str) {
    let mut written: Vec<(i64, String, i64)> = survivor
        .audit(admin, "rollout.transition")
        .await
        .unwrap()
        .iter()
        .filter(|e| e["target"] == rollout)
        .map(|e| {
            let actor = e["actor"].as_str().unwrap();
            let (holder, epoch) = actor
                .strip_prefix("system:rollouts@")
                .and_then(|rest| rest.rsplit_once('#'))
                .unwrap_or_else(|| panic!("actor {actor} names no holder and epoch"));
            (
                e["id"].as_i64().unwrap(),
                holder.to_string(),
                epoch.parse().unwrap(),
            )
        })
        .collect();
    written.sort();
    assert!(
        written.windows(2).all(|w| w[0].2 <= w[1].2),
        "a write under an older epoch after a newer one: {written:?}"
    );
    let holders: BTreeSet<(&str, i64)> = written.iter().map(|(_, h, e)| (h.as_str(), *e)).collect();
    let names: BTreeSet<&str> = holders.iter().map(|(h, _)| *h).collect();
    assert_eq!(holders.len(), 2, "two tenures, one epoch each: {written:?}");
    assert_eq!(names.len(), 2, "two holders: {written:?}");
    let (first, last) = (&written[0], &written[written.len() - 1]);
    assert!(first.2 < last.2, "{written:?}");
}

/// Two survivors find the same dead peer: exactly one drains its session, and together they
/// store everything the broker acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_survivors_race_for_a_dead_replicas_session_and_one_drains_it() {
    let Rig {
        a,
        b,
        admin,
        ids,
        sessions,
        _broker,
    } = rig(30, &[]).await;
    let url = format!("mqtts://localhost:{}", _broker.1.service_port);
    let mut c = a
        .start_replica(&["--broker-url", &url, "--replica-id", "r3"])
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sends: Vec<_> = sessions
        .into_iter()
        .zip(&ids)
        .map(|(s, id)| tokio::spawn(send_readings_until(s, id.device_id.clone(), stop.clone())))
        .collect();
    wait_for(
        "three replicas ingesting",
        Duration::from_secs(30),
        || async {
            let r = [
                received(&a, &admin).await,
                received(&b, &admin).await,
                received(&c, &admin).await,
            ];
            r.iter().all(|n| *n > 100).then_some(())
        },
    )
    .await
    .unwrap();
    // C dies holding messages it could not commit.
    let stall = a.database.stall_telemetry().await.unwrap();
    wait_for(
        "C taking messages it cannot commit",
        Duration::from_secs(30),
        || async { (holding(&c, &admin).await >= 50).then_some(()) },
    )
    .await
    .unwrap();
    c.proc.kill_hard();
    drop(stall);
    stop.store(true, Ordering::Relaxed);
    let mut sent = BTreeSet::new();
    for done in futures::future::join_all(sends).await {
        sent.extend(done.unwrap().1);
    }
    assert_stored_exactly(&a, &sent).await;
    let adopted = || async {
        link_count(&a, &admin, "adopted").await + link_count(&b, &admin, "adopted").await
    };
    wait_for("a survivor drained C", Duration::from_secs(30), || async {
        (adopted().await > 0).then_some(())
    })
    .await
    .unwrap();
    // Three more scans: the ended lease is not taken again by the other survivor.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(adopted().await, 1);
    for survivor in [&a, &b] {
        assert_eq!(link_count(survivor, &admin, "unsentAcks").await, 0);
    }
}
