//! What the device knows was delivered, in simulated time: messages that must arrive carry a
//! token, stay in the outbox until the shell reports their PUBACK, are sent again after every
//! reconnect, and what waits on them (an OTA outcome recorded as reported, a reboot) waits.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_device_core::{
    Action, Awaiting, BootedImage, COMMANDS_DONE_KEPT, Config, Persist, RETRY_MS, Stored,
};
use flotilla_proto::{CommandReply, CommandStatus, OtaOffer, OtaPhase, OtaStatus, decode, encode};
use serde_json::json;

mod common;
use common::{CONFIRM_MS, Sim, key, manifest, ota_config as config, provisioning, sign};

fn connected(version: &str, stored: Stored) -> Sim {
    connected_with_seed(version, stored, 7)
}

fn connected_with_seed(version: &str, stored: Stored, seed: u64) -> Sim {
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        ..stored
    };
    let mut sim = Sim::boot_with_seed(config(version), stored, seed);
    sim.auto_ack = false;
    sim.device.handle_wifi_connected(0);
    sim.device.handle_wall_clock(0, 1_850_000_000_000);
    sim.device.handle_mqtt_connected(0);
    sim.drain();
    sim
}

fn ota_reports(sim: &mut Sim) -> Vec<OtaStatus> {
    sim.published("/ota/status")
        .iter()
        .map(|p| decode(p).unwrap())
        .collect()
}

fn persisted(sim: &Sim, wanted: &Persist) -> usize {
    sim.log
        .iter()
        .filter(|a| **a == Action::Persist(wanted.clone()))
        .count()
}

fn reported(id: &str) -> Persist {
    Persist::OtaReported { id: id.into() }
}

fn reboots(sim: &Sim) -> usize {
    sim.log.iter().filter(|a| **a == Action::Reboot).count()
}

#[test]
fn a_success_published_while_the_link_drops_is_sent_again_after_reconnect_and_recorded_once() {
    let awaiting = Awaiting {
        id: "u1".into(),
        version: "1.3.0".into(),
    };
    let stored = Stored {
        booted: BootedImage::PendingVerify,
        ota_awaiting: Some(awaiting),
        ..Stored::default()
    };
    let mut sim = connected("1.3.0", stored);
    sim.run_until(CONFIRM_MS);
    assert!(sim.log.contains(&Action::ConfirmImage));
    assert_eq!(ota_reports(&mut sim).len(), 1);
    assert_eq!(sim.device.unacknowledged(), 1);
    // The link drops before the PUBACK: not recorded as reported.
    sim.reconnect();
    assert_eq!(persisted(&sim, &reported("u1")), 0);
    let reports = ota_reports(&mut sim);
    assert_eq!(reports.len(), 2, "sent again after the reconnect");
    assert_eq!(reports[0], reports[1]);
    assert_eq!(reports[1].status, OtaPhase::Success);
    sim.acknowledge();
    assert_eq!(persisted(&sim, &reported("u1")), 1);
    assert_eq!(sim.device.unacknowledged(), 0);
    // Once acknowledged it is never sent again.
    sim.reconnect();
    assert_eq!(ota_reports(&mut sim).len(), 2);
    assert_eq!(persisted(&sim, &reported("u1")), 1);
}

fn last_commands_done(sim: &Sim) -> Vec<CommandReply> {
    sim.log
        .iter()
        .rev()
        .find_map(|a| match a {
            Action::Persist(Persist::CommandsDone(done)) => Some(done.clone()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_reboot_waits_for_its_reply_and_a_redelivery_after_the_reboot_is_answered_not_run() {
    let mut sim = connected("1.2.0", Stored::default());
    sim.command("r1", "reboot", json!({}));
    sim.run_until(sim.now + 1);
    // Its id is persisted before its reply goes out.
    let persist_at = sim
        .log
        .iter()
        .position(|a| matches!(a, Action::Persist(Persist::CommandsDone(_))))
        .unwrap();
    let final_reply_at = sim
        .log
        .iter()
        .rposition(|a| matches!(a, Action::Publish(p) if p.topic.ends_with("/reply")))
        .unwrap();
    assert!(persist_at < final_reply_at);
    assert_eq!(
        reboots(&sim),
        0,
        "no reboot before the reply is acknowledged"
    );
    // The reply is lost with the link; sent again on the next one, and only its PUBACK
    // lets the device restart.
    sim.reconnect();
    assert_eq!(reboots(&sim), 0);
    let replies = sim.replies();
    let finals: Vec<_> = replies
        .iter()
        .filter(|r| r.status == CommandStatus::Succeeded)
        .collect();
    assert_eq!(finals.len(), 2);
    sim.acknowledge();
    assert_eq!(reboots(&sim), 1);

    // After the restart the broker redelivers the command: it is answered, not run again.
    let done = last_commands_done(&sim);
    assert_eq!(done.len(), 1);
    let mut after = connected(
        "1.2.0",
        Stored {
            commands_done: done,
            ..Stored::default()
        },
    );
    after.command("r1", "reboot", json!({}));
    after.acknowledge();
    after.run_until(after.now + 60_000);
    assert_eq!(reboots(&after), 0, "the reboot ran twice");
    // Its stored reply: once after the boot (the restart may have beaten its PUBACK), once
    // for the redelivery.
    let answer = after.replies();
    assert_eq!(answer.len(), 2);
    assert!(
        answer
            .iter()
            .all(|r| r.id == "r1" && r.status == CommandStatus::Succeeded)
    );
}

#[test]
fn a_reboot_whose_reply_is_never_acknowledged_restarts_at_its_deadline() {
    let mut sim = connected("1.2.0", Stored::default());
    sim.command("r1", "reboot", json!({}));
    let wait = Config::default().reboot_wait_ms;
    sim.run_until(sim.now + wait - 1);
    assert_eq!(reboots(&sim), 0);
    sim.run_until(sim.now + 1);
    assert_eq!(reboots(&sim), 1);
    // A PUBACK that comes late restarts nothing a second time.
    sim.acknowledge();
    assert_eq!(reboots(&sim), 1);
}

#[test]
fn the_newest_persisted_reply_is_sent_again_after_a_boot() {
    // The restart came before the reply's PUBACK (the deadline, a power cut): the server
    // still waits for it.
    let reply = CommandReply {
        id: "r1".into(),
        status: CommandStatus::Succeeded,
        result: Some(json!({"rebooting": true})),
        error: None,
    };
    let mut sim = connected(
        "1.2.0",
        Stored {
            commands_done: vec![reply.clone()],
            ..Stored::default()
        },
    );
    assert_eq!(sim.replies(), [reply]);
    sim.acknowledge();
    assert_eq!(sim.device.unacknowledged(), 0);
}

#[test]
fn a_rollback_reported_across_a_reboot_before_its_puback_stays_rolled_back() {
    let awaiting = Awaiting {
        id: "u9".into(),
        version: "1.3.0".into(),
    };
    let mut sim = connected(
        "1.2.0",
        Stored {
            booted: BootedImage::RolledBack,
            ota_awaiting: Some(awaiting),
            ..Stored::default()
        },
    );
    let outcome = sim
        .stored_outcome()
        .expect("the rollback is persisted as the outcome at the boot that saw it");
    assert_eq!(outcome.status, OtaPhase::RolledBack);
    assert_eq!(ota_reports(&mut sim), std::slice::from_ref(&outcome));
    // No PUBACK, and the device restarts: NVS holds the outcome (the awaiting record went
    // with the same write), and the bootloader now says only "valid".
    let mut after = connected(
        "1.2.0",
        Stored {
            ota_outcome: Some(outcome.clone()),
            ..Stored::default()
        },
    );
    assert_eq!(ota_reports(&mut after), [outcome]);
}

#[test]
fn commands_done_keeps_the_newest_and_forgets_beyond_its_bound() {
    let mut sim = connected("1.2.0", Stored::default());
    sim.auto_ack = true;
    for i in 0..COMMANDS_DONE_KEPT + 2 {
        sim.command(&format!("r{i}"), "reboot", json!({}));
        sim.run_until(sim.now + 1);
    }
    let done = last_commands_done(&sim);
    assert_eq!(done.len(), COMMANDS_DONE_KEPT);
    assert_eq!(done[0].id, "r2");
    assert_eq!(
        done.last().unwrap().id,
        format!("r{}", COMMANDS_DONE_KEPT + 1)
    );
}

fn offer(id: &str, version: &str) -> OtaOffer {
    OtaOffer {
        id: id.into(),
        manifest: sign(&key(1), &manifest(version, &[9u8; 10_000])),
        url: "https://server/firmware/x".into(),
        force: false,
    }
}

#[test]
fn a_failed_made_offline_is_persisted_and_arrives_after_reconnect() {
    let mut sim = connected("1.2.0", Stored::default());
    sim.auto_ack = true;
    sim.device
        .handle_message(sim.now, "devices/dev-1/ota", &encode(&offer("u5", "1.3.0")));
    sim.drain();
    assert!(sim.log.iter().any(|a| matches!(a, Action::Download { .. })));
    sim.auto_ack = false;
    sim.take_log();
    // The link drops, then the download fails: nothing can go out yet.
    sim.device.handle_mqtt_disconnected(sim.now);
    sim.device
        .handle_ota_finished(sim.now, Err("connection reset".into()));
    sim.drain();
    assert!(ota_reports(&mut sim).is_empty());
    let outcome = sim.stored_outcome().expect("the FAILED is persisted");
    assert_eq!(
        (outcome.status, outcome.id.as_deref()),
        (OtaPhase::Failed, Some("u5"))
    );
    sim.device.handle_mqtt_connected(sim.now);
    sim.drain();
    let reports = ota_reports(&mut sim);
    assert_eq!(reports, [outcome]);
    assert_eq!(persisted(&sim, &reported("u5")), 0);
    sim.acknowledge();
    assert_eq!(persisted(&sim, &reported("u5")), 1);
}

#[test]
fn an_outcome_persisted_before_a_reboot_is_reported_after_it() {
    let outcome = OtaStatus {
        status: OtaPhase::Failed,
        id: Some("u7".into()),
        progress: None,
        version: Some("1.3.0".into()),
        error: Some("image SHA-256 does not match the manifest".into()),
    };
    let mut sim = connected(
        "1.2.0",
        Stored {
            ota_outcome: Some(outcome.clone()),
            ..Stored::default()
        },
    );
    assert_eq!(ota_reports(&mut sim), [outcome]);
    sim.acknowledge();
    assert_eq!(persisted(&sim, &reported("u7")), 1);
}

#[test]
fn a_refused_publish_is_sent_again_after_the_retry_delay() {
    let mut sim = connected("1.2.0", Stored::default());
    sim.command("p1", "ping", json!({}));
    sim.run_until(sim.now + 1);
    let token = *sim.unacked.last().unwrap();
    sim.unacked.clear();
    let sent = sim.replies().len();
    let refused_at = sim.now;
    sim.device.handle_publish_refused(refused_at, token);
    sim.run_until(refused_at + RETRY_MS - 1);
    assert_eq!(sim.replies().len(), sent);
    sim.run_until(refused_at + RETRY_MS * 3 / 2);
    assert_eq!(sim.replies().len(), sent + 1);
    assert_eq!(
        sim.replies().last().unwrap().status,
        CommandStatus::Succeeded
    );
    sim.acknowledge();
    assert_eq!(sim.device.unacknowledged(), 0);
    sim.run_until(sim.now + 10 * RETRY_MS);
    assert_eq!(sim.replies().len(), sent + 1);
}

/// A fleet refused at one instant comes back spread over the half retry delay after the first.
#[test]
fn refused_publishes_of_many_devices_are_retried_at_different_times() {
    let mut retried_at = Vec::new();
    for seed in 1..=40u64 {
        let mut sim = connected_with_seed("1.2.0", Stored::default(), seed);
        sim.command("p1", "ping", json!({}));
        sim.run_until(sim.now + 1);
        let token = *sim.unacked.last().unwrap();
        let sent = sim.replies().len();
        let refused_at = sim.now;
        sim.device.handle_publish_refused(refused_at, token);
        let mut at = refused_at;
        while sim.replies().len() == sent && at < refused_at + 2 * RETRY_MS {
            at += 10;
            sim.run_until(at);
        }
        assert!(
            (RETRY_MS..=RETRY_MS * 3 / 2 + 10).contains(&(at - refused_at)),
            "retried {} ms after the refusal",
            at - refused_at
        );
        retried_at.push(at - refused_at);
    }
    retried_at.sort_unstable();
    retried_at.dedup();
    assert!(retried_at.len() > 20, "{retried_at:?}");
}

#[test]
fn a_full_outbox_keeps_its_bound_and_the_newest_messages() {
    let capacity = Config::default().outbox_capacity;
    // An OTA outcome waits for its PUBACK while a flood of commands fills the outbox: the
    // plain replies give way, the outcome stays.
    let outcome = OtaStatus {
        status: OtaPhase::Failed,
        id: Some("u7".into()),
        progress: None,
        version: Some("1.3.0".into()),
        error: Some("connection reset".into()),
    };
    let mut sim = connected(
        "1.2.0",
        Stored {
            ota_outcome: Some(outcome.clone()),
            ..Stored::default()
        },
    );
    for i in 0..capacity + 4 {
        sim.command(&format!("p{i}"), "ping", json!({}));
        sim.run_until(sim.now + 1);
    }
    assert_eq!(sim.device.unacknowledged(), capacity);
    sim.take_log();
    sim.reconnect();
    assert_eq!(ota_reports(&mut sim), [outcome]);
    let resent: Vec<String> = sim.replies().into_iter().map(|r| r.id).collect();
    let newest: Vec<String> = (5..capacity + 4).map(|i| format!("p{i}")).collect();
    assert_eq!(resent, newest);
    sim.acknowledge();
    assert_eq!(sim.device.unacknowledged(), 0);
}
