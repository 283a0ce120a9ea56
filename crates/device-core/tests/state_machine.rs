//! Deterministic simulated-time tests of the device brain: no sleeps, no sockets, no clock.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_device_core::{
    Action, Backoff, BackoffConfig, Config, CsrFailure, Persist, ProvisionError, ProvisionRequest,
    Rng, SensorValues, State, Stored,
};
use flotilla_proto::{Command, CommandStatus, LedState, decode, encode};
use proptest::prelude::*;
use serde_json::json;

mod common;
use common::{Sim, provisioning};

fn request() -> ProvisionRequest {
    serde_json::from_value(json!({"ssid":"HomeNet","password":"secret123","device_id":"dev-1","provisioning_token":"tok"})).unwrap()
}

#[test]
fn fresh_device_walks_every_provisioning_state_in_order() {
    let mut sim = Sim::boot(Config::default(), Stored::default());
    assert_eq!(sim.device.status_word(), "provisioning");
    sim.device
        .handle_provision(0, request(), Some("bearer".into()))
        .unwrap();
    sim.drain();
    sim.device.handle_wifi_connected(10);
    sim.drain();
    assert!(sim.log.iter().any(|a| matches!(a, Action::SubmitCsr { device_id, token } if device_id.as_str() == "dev-1" && token == "tok")));
    sim.device.handle_csr_result(20, Ok(()));
    sim.drain();
    assert!(sim.log.iter().any(|a| matches!(a, Action::ConnectMqtt { client_id, will } if client_id.as_str() == "dev-1" && will.retain)));
    sim.device.handle_mqtt_connected(30);
    sim.drain();
    use State::*;
    assert_eq!(
        sim.transitions,
        vec![
            CheckProvisioning,
            ApMode,
            WifiConnecting,
            WifiConnected,
            CheckCertificates,
            SubmitCsr,
            MqttConnecting,
            MqttConnected
        ]
    );
    assert_eq!(sim.device.status_word(), "connected");
    // The bearer token was stored with the provisioning data, apart from the one-time token.
    assert!(sim.log.iter().any(|a| matches!(a, Action::Persist(Persist::Provisioning(p)) if p.bearer_token.as_deref() == Some("bearer"))));
}

#[test]
fn provisioned_device_with_certificate_skips_ap_and_csr_after_restart() {
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        ..Stored::default()
    };
    let mut sim = Sim::boot(Config::default(), stored);
    sim.device.handle_wifi_connected(0);
    sim.drain();
    assert!(
        !sim.log
            .iter()
            .any(|a| matches!(a, Action::StartAccessPoint | Action::SubmitCsr { .. }))
    );
    assert_eq!(sim.device.state(), State::MqttConnecting);
}

#[test]
fn invalid_provisioning_is_refused_and_changes_nothing() {
    let mut sim = Sim::boot(Config::default(), Stored::default());
    sim.take_log();
    let mut bad = request();
    bad.device_id = "a/b".into();
    assert!(matches!(
        sim.device.handle_provision(0, bad, None),
        Err(ProvisionError::BadDeviceId(_))
    ));
    let mut bad = request();
    bad.password = "short".into();
    assert_eq!(
        sim.device.handle_provision(0, bad, None),
        Err(ProvisionError::BadPassword)
    );
    sim.drain();
    assert!(sim.log.is_empty());
    assert_eq!(sim.device.state(), State::ApMode);
}

#[test]
fn refused_token_returns_to_ap_mode_and_forgets_it() {
    let mut sim = Sim::boot(Config::default(), Stored::default());
    sim.device.handle_provision(0, request(), None).unwrap();
    sim.device.handle_wifi_connected(1);
    sim.device.handle_csr_result(2, Err(CsrFailure::Refused));
    sim.drain();
    assert_eq!(sim.device.state(), State::ApMode);
    assert!(
        sim.log
            .contains(&Action::Persist(Persist::ClearProvisioning))
    );
}

#[test]
fn transient_csr_failure_retries_after_backoff() {
    let mut sim = Sim::boot(Config::default(), Stored::default());
    sim.device.handle_provision(0, request(), None).unwrap();
    sim.device.handle_wifi_connected(0);
    sim.device.handle_csr_result(0, Err(CsrFailure::Transient));
    sim.drain();
    sim.take_log();
    let at = sim.device.poll_timeout().expect("a retry is scheduled");
    assert!(at <= BackoffConfig::default().base_ms);
    sim.run_until(at);
    assert!(
        sim.log
            .iter()
            .any(|a| matches!(a, Action::SubmitCsr { .. }))
    );
}

/// A rate-limited, oversized or failing `/sign-csr` answer keeps the provisioning and retries;
/// only the token's own refusals (401, 403, 409) forget it.
#[test]
fn only_the_tokens_own_refusals_forget_provisioning() {
    assert_eq!(CsrFailure::from_status(201), None);
    for status in [400, 404, 408, 413, 429, 500, 502, 503] {
        let mut sim = Sim::boot(Config::default(), Stored::default());
        sim.device.handle_provision(0, request(), None).unwrap();
        sim.device.handle_wifi_connected(1);
        let failure = CsrFailure::from_status(status).expect("a failure");
        sim.device.handle_csr_result(2, Err(failure));
        sim.drain();
        assert!(
            !sim.log
                .contains(&Action::Persist(Persist::ClearProvisioning)),
            "{status} wiped provisioning"
        );
        assert_eq!(sim.device.state(), State::SubmitCsr, "{status}");
        let at = sim.device.poll_timeout().expect("a retry is scheduled");
        sim.take_log();
        sim.run_until(at);
        assert!(
            sim.log
                .iter()
                .any(|a| matches!(a, Action::SubmitCsr { .. })),
            "{status}: submitted again"
        );
    }
    for status in [401, 403, 409] {
        let mut sim = Sim::boot(Config::default(), Stored::default());
        sim.device.handle_provision(0, request(), None).unwrap();
        sim.device.handle_wifi_connected(1);
        sim.device
            .handle_csr_result(2, Err(CsrFailure::from_status(status).unwrap()));
        sim.drain();
        assert_eq!(sim.device.state(), State::ApMode, "{status}");
        assert!(
            sim.log
                .contains(&Action::Persist(Persist::ClearProvisioning))
        );
    }
}

#[test]
fn heartbeats_follow_the_interval_and_carry_version_and_crashes() {
    let config = Config {
        firmware_version: "1.2.3".into(),
        heartbeat_ms: 1000,
        ..Config::default()
    };
    let mut sim = Sim::connected(config);
    sim.device.handle_platform_stats(18000, Some(-40));
    sim.run_until(5_500);
    let beats = sim.published("/health");
    assert_eq!(beats.len(), 5);
    let hb: flotilla_proto::Heartbeat = decode(&beats[0]).unwrap();
    assert_eq!(
        (hb.heap, hb.fw.as_str(), hb.rssi, hb.crashes),
        (18000, "1.2.3", Some(-40), Some(0))
    );
    // Uptime counts from boot in seconds: the fifth beat, at 5 s, says 5.
    let last: flotilla_proto::Heartbeat = decode(&beats[4]).unwrap();
    assert_eq!(last.uptime, Some(5));
}

#[test]
fn telemetry_sequence_survives_reboot_without_reuse() {
    let config = Config {
        telemetry_ms: 100,
        seq_reservation: 10,
        ..Config::default()
    };
    let mut sim = Sim::connected(config.clone());
    sim.device.handle_sensor_values(SensorValues {
        pot: Some(1841),
        switch: Some(true),
        temp: Some(21.5),
    });
    sim.run_until(2_500);
    let persisted_high_water = sim
        .log
        .iter()
        .filter_map(|a| match a {
            Action::Persist(Persist::SeqHighWater(n)) => Some(*n),
            _ => None,
        })
        .max()
        .unwrap();
    let seqs: Vec<u64> = sim
        .published("/telemetry")
        .iter()
        .map(|p| decode::<flotilla_proto::Telemetry>(p).unwrap().seq)
        .collect();
    // The connection took number 0 as its session's (see order_keys_...).
    assert_eq!(seqs, (1..26).collect::<Vec<_>>());
    assert!(
        (26..=30).contains(&persisted_high_water),
        "one write per 10 readings"
    );
    // Power cut; the next boot starts at the persisted high-water mark.
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        seq_high_water: persisted_high_water,
        ..Stored::default()
    };
    let mut sim = Sim::boot(config, stored);
    sim.device.handle_wifi_connected(0);
    sim.device.handle_mqtt_connected(0);
    sim.device.handle_sensor_values(SensorValues {
        pot: Some(1),
        switch: None,
        temp: None,
    });
    sim.drain();
    sim.run_until(100);
    let first: flotilla_proto::Telemetry = decode(&sim.published("/telemetry")[0]).unwrap();
    assert!(first.seq > 25);
}

#[test]
fn disabled_sensor_is_left_out_of_telemetry() {
    let mut sim = Sim::connected(Config {
        telemetry_ms: 100,
        ..Config::default()
    });
    sim.device.handle_sensor_values(SensorValues {
        pot: Some(5),
        switch: Some(false),
        temp: Some(20.0),
    });
    sim.command("c1", "sensor", json!({"sensor":"temp","enabled":false}));
    sim.run_until(150);
    let t: flotilla_proto::Telemetry = decode(sim.published("/telemetry").last().unwrap()).unwrap();
    assert_eq!((t.pot, t.switch, t.temp), (Some(5), Some(false), None));
}

#[test]
fn led_command_is_accepted_executed_persisted_and_reported() {
    let mut sim = Sim::connected(Config::default());
    sim.command("c1", "led", json!({"state":"ON"}));
    // Accepted at once; executed on the next timeout, never inside message handling.
    assert_eq!(
        sim.replies().iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![CommandStatus::Accepted]
    );
    assert_eq!(sim.device.led().0, LedState::Off);
    let now = sim.now;
    sim.run_until(now);
    assert_eq!(sim.device.led().0, LedState::On);
    assert!(sim.log.contains(&Action::SetLed {
        state: LedState::On,
        brightness: 100
    }));
    assert!(sim.log.contains(&Action::Persist(Persist::Led {
        state: LedState::On,
        brightness: 100
    })));
    let last = sim.replies().pop().unwrap();
    assert_eq!(
        (last.status, last.result),
        (CommandStatus::Succeeded, Some(json!({"state":"ON"})))
    );
    let status: flotilla_proto::Status = decode(sim.published("/status").last().unwrap()).unwrap();
    assert_eq!(status.led, Some(LedState::On));
}

#[test]
fn duplicate_command_never_runs_twice_and_gets_its_first_reply_again() {
    let mut sim = Sim::connected(Config::default());
    sim.command("c1", "led_brightness", json!({"value": 40}));
    sim.run_until(0);
    sim.take_log();
    sim.command("c1", "led_brightness", json!({"value": 40}));
    sim.run_until(10);
    assert!(!sim.log.iter().any(|a| matches!(a, Action::SetLed { .. })));
    let replies = sim.replies();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].status, CommandStatus::Succeeded);
}

#[test]
fn expired_command_is_refused_unrun() {
    let mut sim = Sim::connected(Config::default());
    let c = Command {
        id: "old".into(),
        name: "led".into(),
        args: json!({"state":"ON"}),
        expires_at: 10,
    };
    sim.device
        .handle_message(0, "devices/dev-1/command", &encode(&c));
    sim.drain();
    sim.run_until(10);
    let r = sim.replies();
    assert_eq!(
        (r.len(), r[0].status, r[0].error.as_deref()),
        (1, CommandStatus::Failed, Some("expired"))
    );
    assert_eq!(sim.device.led().0, LedState::Off);
}

#[test]
fn full_queue_refuses_extra_commands_without_losing_queued_ones() {
    let mut sim = Sim::connected(Config {
        command_queue: 3,
        ..Config::default()
    });
    for i in 0..5 {
        sim.command(&format!("c{i}"), "ping", json!({}));
    }
    let refused: Vec<String> = sim
        .replies()
        .into_iter()
        .filter(|r| r.status == CommandStatus::Failed)
        .map(|r| r.id)
        .collect();
    assert_eq!(refused, vec!["c3", "c4"]);
    assert_eq!(sim.device.queued_commands(), 3);
    sim.run_until(1);
    let done: Vec<String> = sim
        .replies()
        .into_iter()
        .filter(|r| r.status == CommandStatus::Succeeded)
        .map(|r| r.id)
        .collect();
    assert_eq!(done, vec!["c0", "c1", "c2"]);
    // Refused commands were not remembered, so a resend after the queue drained runs.
    sim.take_log();
    sim.command("c3", "ping", json!({}));
    sim.run_until(2);
    assert_eq!(
        sim.replies().last().unwrap().status,
        CommandStatus::Succeeded
    );
}

#[test]
fn messages_for_other_devices_and_garbage_are_ignored() {
    let mut sim = Sim::connected(Config::default());
    let c = Command {
        id: "x".into(),
        name: "led".into(),
        args: json!({"state":"ON"}),
        expires_at: u64::MAX,
    };
    sim.device
        .handle_message(0, "devices/dev-2/command", &encode(&c));
    sim.device
        .handle_message(0, "devices/dev-1/command", b"\xff\x00not json");
    sim.device
        .handle_message(0, "devices/dev-1/command", &vec![b'{'; 100_000]);
    sim.drain();
    sim.run_until(5);
    assert!(sim.replies().is_empty());
    assert_eq!(sim.device.led().0, LedState::Off);
}

#[test]
fn unknown_and_bad_commands_fail_with_a_reason() {
    let mut sim = Sim::connected(Config::default());
    sim.command("a", "selfdestruct", json!({}));
    sim.command("b", "led_brightness", json!({"value": 101}));
    sim.command("c", "led", json!({"state":"BLUE"}));
    sim.run_until(5);
    let failed: Vec<(String, String)> = sim
        .replies()
        .into_iter()
        .filter(|r| r.status == CommandStatus::Failed)
        .map(|r| (r.id, r.error.unwrap()))
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(failed[0].1.contains("unknown command"));
}

#[test]
fn reboot_command_replies_before_rebooting() {
    let mut sim = Sim::connected(Config::default());
    sim.command("r", "reboot", json!({}));
    sim.run_until(1);
    let pos_reply = sim
        .log
        .iter()
        .rposition(|a| matches!(a, Action::Publish(p) if p.topic.ends_with("/reply")))
        .unwrap();
    let pos_reboot = sim.log.iter().position(|a| *a == Action::Reboot).unwrap();
    assert!(pos_reply < pos_reboot);
}

#[test]
fn unstable_boot_counter_increments_at_boot_and_clears_after_stable_connection() {
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        unstable_boots: 2,
        ..Stored::default()
    };
    let mut sim = Sim::boot(Config::default(), stored);
    assert!(
        sim.log
            .contains(&Action::Persist(Persist::UnstableBoots(3)))
    );
    assert_eq!(sim.device.unstable_boots(), 2);
    sim.device.handle_wifi_connected(0);
    sim.device.handle_mqtt_connected(0);
    sim.drain();
    sim.run_until(BackoffConfig::default().stable_ms);
    assert!(
        sim.log
            .contains(&Action::Persist(Persist::UnstableBoots(0)))
    );
}

#[test]
fn reconnect_backoff_grows_and_resets_after_a_stable_period() {
    let backoff = BackoffConfig {
        base_ms: 100,
        cap_ms: 10_000,
        stable_ms: 5_000,
    };
    let mut sim = Sim::connected(Config {
        backoff,
        ..Config::default()
    });
    let mut ceilings = Vec::new();
    for _ in 0..10 {
        let now = sim.now;
        sim.device.handle_mqtt_disconnected(now);
        sim.drain();
        let at = sim.device.poll_timeout().unwrap();
        ceilings.push(at - now);
        sim.run_until(at);
        assert_eq!(sim.device.state(), State::MqttConnecting);
    }
    for (n, delay) in ceilings.iter().enumerate() {
        assert!(
            *delay <= (100u64 << n).min(10_000),
            "attempt {n} waited {delay}"
        );
    }
    // A connection that lasts past the stable period resets the attempt count.
    let now = sim.now;
    sim.device.handle_mqtt_connected(now);
    sim.run_until(now + 5_000);
    let now = sim.now;
    sim.device.handle_mqtt_disconnected(now);
    assert!(sim.device.poll_timeout().unwrap() - now <= 100);
}

proptest! {
    #[test]
    fn full_jitter_stays_within_the_capped_exponential_ceiling(seed in any::<u64>(), base in 1u64..5_000, cap in 1u64..120_000, attempts in 1usize..64) {
        let mut rng = Rng::new(seed);
        let mut b = Backoff::new(BackoffConfig { base_ms: base, cap_ms: cap, stable_ms: 1 });
        for n in 0..attempts {
            let ceiling = base.saturating_mul(1u64 << n.min(32)).min(cap);
            prop_assert_eq!(b.ceiling_ms(), ceiling);
            prop_assert!(b.next_delay_ms(&mut rng) <= ceiling);
        }
    }

    #[test]
    fn any_message_bytes_on_any_topic_never_panic(topic in "devices/dev-1/(command|config|ota|x)", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut sim = Sim::connected(Config::default());
        sim.device.handle_message(0, &topic, &bytes);
        sim.run_until(10);
    }
}

#[test]
fn jitter_spreads_a_fleet_reconnecting_at_once() {
    // 1,000 devices lose the broker at the same instant; their first retries must not bunch up.
    let mut delays: Vec<u64> = (1..=1000u64)
        .map(|seed| {
            let mut b = Backoff::new(BackoffConfig {
                base_ms: 1000,
                cap_ms: 60_000,
                stable_ms: 1,
            });
            b.next_delay_ms(&mut Rng::new(seed.wrapping_mul(0x9E3779B97F4A7C15)))
        })
        .collect();
    delays.sort_unstable();
    let buckets = delays.chunk_by(|a, b| a / 100 == b / 100).count();
    assert!(
        buckets >= 9,
        "1,000 devices fell into only {buckets} of 10 100-ms buckets"
    );
}

/// The order keys of every state message rise through a session; its will (handed to the
/// broker at connect) is above them all; the next session, and the first after a power cut,
/// start above that will.
#[test]
fn order_keys_rise_the_will_ends_its_session_and_every_later_session_starts_above_it() {
    let config = Config {
        heartbeat_ms: 100,
        telemetry_ms: 70,
        seq_reservation: 4,
        ..Config::default()
    };
    let stored = Stored {
        provisioning: Some(provisioning()),
        has_certificate: true,
        ..Stored::default()
    };
    let mut sim = Sim::boot(config.clone(), stored);
    sim.device.handle_sensor_values(SensorValues {
        pot: Some(1),
        switch: None,
        temp: None,
    });
    sim.device.handle_wifi_connected(0);
    sim.drain();
    // Three sessions: the second after a dropped link, the third after a power cut.
    let mut sessions: Vec<(u64, Vec<u64>)> = Vec::new();
    let mut high_water = 0;
    let note_high_water = |high_water: &mut u64, log: &[Action]| {
        for a in log {
            if let Action::Persist(Persist::SeqHighWater(n)) = a {
                *high_water = (*high_water).max(*n);
            }
        }
    };
    for session in 0..3 {
        if session == 2 {
            let stored = Stored {
                provisioning: Some(provisioning()),
                has_certificate: true,
                seq_high_water: high_water,
                ..Stored::default()
            };
            sim = Sim::boot(config.clone(), stored);
            sim.device.handle_sensor_values(SensorValues {
                pot: Some(1),
                switch: None,
                temp: None,
            });
            sim.device.handle_wifi_connected(0);
        } else if session == 1 {
            sim.device.handle_mqtt_disconnected(sim.now);
            sim.drain();
            let retry = sim.device.poll_timeout().unwrap();
            sim.run_until(retry);
        }
        sim.drain();
        let log = sim.take_log();
        note_high_water(&mut high_water, &log);
        let will = log
            .into_iter()
            .find_map(|a| match a {
                Action::ConnectMqtt { will, .. } => Some(will),
                _ => None,
            })
            .expect("a connect with its will");
        let will: flotilla_proto::Status = decode(&will.payload).unwrap();
        sim.device.handle_mqtt_connected(sim.now);
        sim.drain();
        sim.run_until(sim.now + 450);
        // A goodbye, as the agent sends before it closes the connection on purpose.
        let goodbye = sim.device.goodbye("shutdown").unwrap();
        sim.log.push(Action::Publish(goodbye));
        let log = sim.take_log();
        note_high_water(&mut high_water, &log);
        let keys: Vec<u64> = log
            .iter()
            .filter_map(|a| match a {
                Action::Publish(p) => Some(p),
                _ => None,
            })
            .map(|p| {
                let v: serde_json::Value = decode(&p.payload).unwrap();
                v["ord"].as_u64().unwrap_or_else(|| panic!("no key: {v}"))
            })
            .collect();
        assert!(keys.len() >= 8, "status, heartbeats, readings: {keys:?}");
        sessions.push((will.ord.unwrap(), keys));
    }
    let mut last_will = None;
    for (will, keys) in &sessions {
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "rising: {keys:?}");
        assert!(keys.iter().all(|k| k < will), "{will} above {keys:?}");
        if let Some(before) = last_will {
            assert!(keys[0] > before, "{} above the last will {before}", keys[0]);
        }
        last_will = Some(*will);
    }
}
