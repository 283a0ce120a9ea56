//! The OTA part of the device state machine, in simulated time: offer -> STARTED -> download
//! -> IN_PROGRESS -> activate + reboot -> probation -> confirm -> SUCCESS; refusals; resume
//! after a reboot; a probation that never ends reboots; a rollback is reported.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_device_core::{Action, Awaiting, BootedImage, Persist, Stored};
use flotilla_proto::{OtaOffer, OtaPhase, OtaStatus, decode, encode};

mod common;
use common::{
    CONFIRM_MS, DEADLINE_MS, Sim, key, manifest, ota_config as config, provisioning, sign,
};

fn offer(id: &str, version: &str, signer: u8) -> OtaOffer {
    OtaOffer {
        id: id.into(),
        manifest: sign(&key(signer), &manifest(version, &[9u8; 10_000])),
        url: "https://server/firmware/x".into(),
        force: false,
    }
}

fn ota_reports(sim: &mut Sim) -> Vec<OtaStatus> {
    sim.published("/ota/status")
        .iter()
        .map(|p| decode(p).unwrap())
        .collect()
}

fn send(sim: &mut Sim, offer: &OtaOffer) {
    sim.device
        .handle_message(sim.now, "devices/dev-1/ota", &encode(offer));
    sim.drain();
}

fn booted(version: &str, stored: Stored) -> Sim {
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        ..stored
    };
    let mut sim = Sim::boot(config(version), stored);
    sim.device.handle_wifi_connected(0);
    sim.device.handle_wall_clock(0, 1_850_000_000_000);
    sim.drain();
    sim.device.handle_mqtt_connected(0);
    sim.drain();
    sim
}

#[test]
fn an_accepted_offer_downloads_installs_and_reboots_in_order() {
    let mut sim = Sim::connected(config("1.2.0"));
    sim.device.handle_wall_clock(0, 1_850_000_000_000);
    send(&mut sim, &offer("u1", "1.3.0", 1));
    let log = sim.take_log();
    assert!(log.contains(&Action::Persist(Persist::OtaJob(Some(offer(
        "u1", "1.3.0", 1
    ))))));
    assert!(
        log.iter()
            .any(|a| matches!(a, Action::Download { resume: false, manifest, .. } if manifest.version == "1.3.0"))
    );
    sim.log = log;
    let started = ota_reports(&mut sim);
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].status, OtaPhase::Started);
    assert_eq!(started[0].id.as_deref(), Some("u1"));
    sim.take_log();

    for received in (0..=10_000).step_by(500) {
        sim.device.handle_ota_progress(sim.now, received);
    }
    sim.drain();
    let progress: Vec<u8> = ota_reports(&mut sim)
        .iter()
        .map(|s| s.progress.unwrap())
        .collect();
    assert_eq!(progress, [10, 20, 30, 40, 50, 60, 70, 80, 90]);
    sim.take_log();

    sim.device.handle_ota_finished(sim.now, Ok(()));
    sim.drain();
    let log = sim.take_log();
    let installed = Action::Persist(Persist::OtaInstalled(Awaiting {
        id: "u1".into(),
        version: "1.3.0".into(),
    }));
    let pos = |a: &Action| log.iter().position(|x| x == a).unwrap();
    assert!(pos(&installed) < pos(&Action::ActivateImage));
    assert!(pos(&Action::ActivateImage) < pos(&Action::Reboot));
}

#[test]
fn a_new_image_is_confirmed_only_after_staying_connected() {
    let awaiting = Awaiting {
        id: "u1".into(),
        version: "1.3.0".into(),
    };
    let mut sim = booted(
        "1.3.0",
        Stored {
            booted: BootedImage::PendingVerify,
            ota_awaiting: Some(awaiting),
            ..Stored::default()
        },
    );
    // A drop before the health check passes restarts it.
    sim.run_until(CONFIRM_MS - 1);
    sim.device.handle_mqtt_disconnected(sim.now);
    sim.run_until(CONFIRM_MS + 100);
    assert!(!sim.log.contains(&Action::ConfirmImage));
    sim.device.handle_mqtt_connected(sim.now);
    sim.drain();
    let at = sim.now;
    sim.run_until(at + CONFIRM_MS);
    assert!(sim.log.contains(&Action::ConfirmImage));
    assert!(
        sim.log
            .contains(&Action::Persist(Persist::OtaReported { id: "u1".into() }))
    );
    let reports = ota_reports(&mut sim);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].status, OtaPhase::Success);
    assert_eq!(reports[0].id.as_deref(), Some("u1"));
    assert_eq!(reports[0].version.as_deref(), Some("1.3.0"));
    // Confirmed: the deadline no longer reboots it.
    sim.run_until(DEADLINE_MS * 2);
    assert!(!sim.log.contains(&Action::Reboot));
}

#[test]
fn an_image_that_never_passes_its_health_check_reboots_at_the_deadline() {
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        booted: BootedImage::PendingVerify,
        ..Stored::default()
    };
    let mut sim = Sim::boot(config("1.3.0"), stored);
    sim.device.handle_wifi_connected(0);
    sim.drain();
    // The broker is never reached.
    sim.run_until(DEADLINE_MS - 1);
    assert!(!sim.log.contains(&Action::Reboot));
    sim.run_until(DEADLINE_MS);
    assert!(sim.log.contains(&Action::Reboot));
    assert!(!sim.log.contains(&Action::ConfirmImage));
}

#[test]
fn a_rolled_back_update_is_reported_once_with_its_offer() {
    let mut sim = booted(
        "1.2.0",
        Stored {
            booted: BootedImage::RolledBack,
            ota_awaiting: Some(Awaiting {
                id: "u9".into(),
                version: "1.3.0".into(),
            }),
            ..Stored::default()
        },
    );
    let reports = ota_reports(&mut sim);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].status, OtaPhase::RolledBack);
    assert_eq!(reports[0].id.as_deref(), Some("u9"));
    assert_eq!(reports[0].version.as_deref(), Some("1.3.0"));
    assert!(reports[0].error.as_deref().unwrap().contains("3 boots"));
    assert!(
        sim.log
            .contains(&Action::Persist(Persist::OtaReported { id: "u9".into() }))
    );
    sim.take_log();
    sim.device.handle_mqtt_disconnected(1);
    sim.device.handle_mqtt_connected(2);
    sim.drain();
    assert!(ota_reports(&mut sim).is_empty());
}

#[test]
fn bad_offers_are_refused_with_a_reason_and_nothing_downloads() {
    let mut unsigned = offer("a", "1.3.0", 1);
    unsigned.manifest.signature.clear();
    let cases = [
        (offer("b", "1.3.0", 2), "trusted"),
        (unsigned, "trusted"),
        (offer("c", "1.1.0", 1), "not newer"),
        (offer("d", "1.2.0", 1), "not newer"),
    ];
    for (bad, reason) in cases {
        let mut sim = Sim::connected(config("1.2.0"));
        sim.device.handle_wall_clock(0, 1_850_000_000_000);
        send(&mut sim, &bad);
        assert!(
            !sim.log.iter().any(|a| matches!(a, Action::Download { .. })),
            "{}",
            bad.id
        );
        let reports = ota_reports(&mut sim);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].status, OtaPhase::Failed);
        assert!(reports[0].error.as_deref().unwrap().contains(reason));
    }
    // An image larger than the slot is refused before a byte moves.
    let mut small = config("1.2.0");
    small.slot_size = 4096;
    let mut sim = Sim::connected(small);
    sim.device.handle_wall_clock(0, 1_850_000_000_000);
    send(&mut sim, &offer("e", "1.3.0", 1));
    assert!(!sim.log.iter().any(|a| matches!(a, Action::Download { .. })));
    assert!(
        ota_reports(&mut sim)[0]
            .error
            .as_deref()
            .unwrap()
            .contains("slot")
    );
}

#[test]
fn a_download_interrupted_by_a_reboot_resumes_without_a_second_started() {
    let job = offer("u2", "1.3.0", 1);
    let mut sim = booted(
        "1.2.0",
        Stored {
            ota_job: Some(job.clone()),
            ..Stored::default()
        },
    );
    assert!(
        sim.log
            .iter()
            .any(|a| matches!(a, Action::Download { resume: true, offer, .. } if offer.id == "u2"))
    );
    assert!(ota_reports(&mut sim).is_empty());
    // A redelivered offer for the same job changes nothing; another one is refused.
    sim.take_log();
    send(&mut sim, &job);
    assert!(sim.log.is_empty());
    send(&mut sim, &offer("u3", "1.4.0", 1));
    let reports = ota_reports(&mut sim);
    assert_eq!(reports[0].status, OtaPhase::Failed);
    assert_eq!(reports[0].id.as_deref(), Some("u3"));
    // A transfer failure ends the job and says why.
    sim.take_log();
    sim.device.handle_ota_finished(
        sim.now,
        Err("image SHA-256 does not match the manifest".into()),
    );
    sim.drain();
    let outcome = sim
        .stored_outcome()
        .expect("the outcome is persisted with the job's end");
    assert_eq!(
        (outcome.status, outcome.id.as_deref()),
        (OtaPhase::Failed, Some("u2"))
    );
    assert_eq!(ota_reports(&mut sim)[0].status, OtaPhase::Failed);
    assert!(!sim.log.contains(&Action::ActivateImage));
}

fn cancel(sim: &mut Sim, id: &str) {
    let message = encode(&flotilla_proto::OtaCancel { cancel: id.into() });
    sim.device
        .handle_message(sim.now, "devices/dev-1/ota", &message);
    sim.drain();
}

#[test]
fn a_cancel_stops_its_download_reports_failed_and_frees_the_device_for_the_next_offer() {
    let mut sim = Sim::connected(config("1.2.0"));
    sim.device.handle_wall_clock(0, 1_850_000_000_000);
    send(&mut sim, &offer("u1", "1.3.0", 1));
    sim.device.handle_ota_progress(sim.now, 4_000);
    sim.drain();
    sim.take_log();

    // Another update's cancel changes nothing.
    cancel(&mut sim, "u0");
    assert!(sim.take_log().is_empty());
    assert!(sim.device.ota_busy());

    cancel(&mut sim, "u1");
    let log = sim.take_log();
    let pos = |a: &Action| log.iter().position(|x| x == a);
    assert!(pos(&Action::CancelDownload).is_some(), "{log:?}");
    sim.log = log;
    assert_eq!(
        sim.stored_outcome().and_then(|o| o.id),
        Some("u1".to_string())
    );
    let reports = ota_reports(&mut sim);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].status, OtaPhase::Failed);
    assert_eq!(reports[0].id.as_deref(), Some("u1"));
    assert!(reports[0].error.as_deref().unwrap().contains("cancelled"));
    assert!(!sim.device.ota_busy());
    sim.take_log();

    // The shell's late result for the cancelled download is ignored: nothing is activated.
    sim.device.handle_ota_finished(sim.now, Ok(()));
    sim.drain();
    assert!(!sim.log.contains(&Action::ActivateImage));
    // A second cancel of it is ignored; the next offer downloads.
    cancel(&mut sim, "u1");
    assert!(sim.take_log().is_empty());
    send(&mut sim, &offer("u2", "1.3.0", 1));
    assert!(
        sim.log
            .iter()
            .any(|a| matches!(a, Action::Download { offer, .. } if offer.id == "u2"))
    );
}

#[test]
fn a_cancel_after_the_image_was_installed_is_too_late_and_the_outcome_follows() {
    let mut sim = booted(
        "1.3.0",
        Stored {
            booted: BootedImage::PendingVerify,
            ota_awaiting: Some(Awaiting {
                id: "u1".into(),
                version: "1.3.0".into(),
            }),
            ..Stored::default()
        },
    );
    cancel(&mut sim, "u1");
    assert!(!sim.log.contains(&Action::CancelDownload));
    sim.run_until(CONFIRM_MS + 1);
    let reports = ota_reports(&mut sim);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].status, OtaPhase::Success);
}
