//! Power cuts at every NVS write of a device at work (issue 10, point 6): telemetry whose
//! sequence numbers are reserved in blocks, a `reboot` command that must not run twice, an
//! LED command. The shell performs the device's actions in order and an NVS write is whole or
//! absent (ESP-IDF's guarantee), so a cut before write *k* is the run's actions up to *k*,
//! and what the chip keeps is the first *k* - 1 writes. After each cut the device boots from
//! those, the broker redelivers every command it had sent, and the device must not reuse a
//! sequence number or run the reboot a second time.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use common::{Sim, provisioning};
use flotilla_device_core::{Action, Config, Persist, SensorValues, Stored};
use flotilla_proto::{CommandStatus, Telemetry, decode};
use serde_json::json;

fn config() -> Config {
    Config {
        firmware_version: "1.0.0".into(),
        telemetry_ms: 1_000,
        // Small blocks: many reservations in a short run.
        seq_reservation: 4,
        ..Config::default()
    }
}

fn chip() -> Stored {
    Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        ..Stored::default()
    }
}

/// What the chip keeps after `writes`, from `stored`: the shell's NVS, modelled.
fn apply(mut stored: Stored, writes: &[&Persist]) -> Stored {
    for p in writes {
        stored.apply(p);
    }
    stored
}

fn seqs(log: &[Action]) -> Vec<u64> {
    log.iter()
        .filter_map(|a| match a {
            Action::Publish(p) if p.topic.ends_with("/telemetry") => {
                Some(decode::<Telemetry>(&p.payload).unwrap().seq)
            }
            _ => None,
        })
        .collect()
}

fn reboots(log: &[Action]) -> usize {
    log.iter().filter(|a| **a == Action::Reboot).count()
}

/// A connected device that reads its sensors.
fn boot(stored: Stored) -> Sim {
    let mut sim = Sim::boot(config(), stored);
    sim.device.handle_sensor_values(SensorValues {
        pot: Some(100),
        switch: Some(true),
        temp: None,
    });
    sim.device.handle_wifi_connected(sim.now);
    sim.drain();
    sim.device.handle_wall_clock(sim.now, 1_850_000_000_000);
    sim.device.handle_mqtt_connected(sim.now);
    sim.drain();
    sim
}

/// The commands of the run, in the order the broker delivered them.
const COMMANDS: [(&str, &str, &str); 3] = [
    ("l1", "led", "ON"),
    ("r1", "reboot", ""),
    ("l2", "led", "OFF"),
];

fn deliver(sim: &mut Sim, (id, name, state): (&str, &str, &str)) {
    let args = if state.is_empty() {
        json!({})
    } else {
        json!({ "state": state })
    };
    sim.command(id, name, args);
    sim.run_until(sim.now + 1);
}

/// The uninterrupted run: telemetry for a while, the commands in between.
fn clean_run() -> Vec<Action> {
    let mut sim = boot(chip());
    let mut log = Vec::new();
    for (k, command) in COMMANDS.into_iter().enumerate() {
        sim.run_until(sim.now + 7_000 + 1_000 * k as u64);
        deliver(&mut sim, command);
        if sim.log.contains(&Action::Reboot) {
            // The shell restarts the chip: what it kept is what was written.
            log.append(&mut sim.log);
            let stored = apply(chip(), &persists(&log));
            sim = boot(stored);
        }
    }
    sim.run_until(sim.now + 10_000);
    log.append(&mut sim.log);
    log
}

fn persists(log: &[Action]) -> Vec<&Persist> {
    log.iter()
        .filter_map(|a| match a {
            Action::Persist(p) => Some(p),
            _ => None,
        })
        .collect()
}

#[test]
fn a_power_cut_before_any_nvs_write_reuses_no_sequence_number_and_runs_no_command_twice() {
    let clean = clean_run();
    assert_eq!(reboots(&clean), 1, "the clean run reboots once");
    let writes: Vec<usize> = clean
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Action::Persist(_)))
        .map(|(i, _)| i)
        .collect();
    let reservations = persists(&clean)
        .iter()
        .filter(|p| matches!(p, Persist::SeqHighWater(_)))
        .count();
    assert!(reservations >= 5, "{reservations} reservations");
    assert!(
        persists(&clean)
            .iter()
            .any(|p| matches!(p, Persist::CommandsDone(_)))
    );

    // A cut before each write, and one after the last.
    let mut points = writes.clone();
    points.push(clean.len());
    for &cut in &points {
        let before = &clean[..cut];
        let stored = apply(chip(), &persists(before));
        let mut sim = boot(stored);
        // The broker sends again every command it had delivered (none was acknowledged as
        // far as the device can tell), then the device runs on.
        for command in COMMANDS {
            deliver(&mut sim, command);
        }
        sim.run_until(sim.now + 10_000);
        let after = &sim.log;

        let (used, new) = (seqs(before), seqs(after));
        assert!(!new.is_empty(), "cut at {cut}: no telemetry after the boot");
        if let Some(last) = used.iter().max() {
            assert!(
                new.iter().all(|s| s > last),
                "cut at {cut}: sequence numbers up to {last} were used, {new:?} sent after"
            );
        }
        // The reboot ran once at most before the cut; with the redelivery, once in all.
        // (The restart the redelivered command asks for is the one action after the cut
        // that may stand for it.)
        let ran_before = reboots(before);
        let ran_after = reboots(after);
        assert!(
            ran_before + ran_after <= 1,
            "cut at {cut}: the reboot ran {ran_before} + {ran_after} times"
        );
        // Whatever ran, the redelivered reboot was answered.
        let answered = sim
            .replies()
            .iter()
            .any(|r| r.id == "r1" && r.status == CommandStatus::Succeeded);
        assert!(answered, "cut at {cut}: the reboot went unanswered");
    }
    println!(
        "NVS power cuts tested at {} points ({} writes: {reservations} sequence reservations, \
         command ids, LED state)",
        points.len(),
        writes.len()
    );
}
