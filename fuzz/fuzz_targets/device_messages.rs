//! device-core's message handling: a connected device fed arbitrary messages on its topics,
//! with its link dropping and its publishes acknowledged, refused or never answered as the
//! input says, never panics, every action it asks for can be drained, and its outbox stays
//! within its bound.
#![no_main]

use flotilla_device_core::{Action, Config, Device, Provisioning, Stored};
use flotilla_proto::DeviceId;
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 5] = [
    "devices/fuzz-1/command",
    "devices/fuzz-1/ota",
    "devices/fuzz-1/config",
    "devices/other/command",
    "devices/fuzz-1/health",
];

fuzz_target!(|data: &[u8]| {
    let mut device = Device::new(Config::default(), 42);
    device.handle_boot(
        0,
        Stored {
            provisioning: Some(Provisioning {
                ssid: "lab".into(),
                password: String::new(),
                device_id: DeviceId::parse("fuzz-1").expect("id"),
                provisioning_token: "t".into(),
                bearer_token: None,
            }),
            has_certificate: true,
            ..Stored::default()
        },
    );
    device.handle_wifi_connected(1);
    device.handle_mqtt_connected(2);
    let mut now = 3;
    let capacity = Config::default().outbox_capacity;
    let mut tokens = Vec::new();
    // Messages are separated by 0xff; the first byte of each picks its topic (low 3 bits)
    // and what the link does (bit 3: drops and comes back first; bits 4-5: what becomes of
    // the publishes that must arrive: acknowledged, refused, or left unanswered).
    for chunk in data.split(|b| *b == 0xff) {
        let Some((pick, payload)) = chunk.split_first() else {
            continue;
        };
        if pick & 0x08 != 0 {
            tokens.clear();
            device.handle_mqtt_disconnected(now);
            device.handle_mqtt_connected(now);
        }
        device.handle_message(now, TOPICS[(*pick as usize & 7) % TOPICS.len()], payload);
        now += 10;
        device.handle_timeout(now);
        let mut drained = 0;
        while let Some(action) = device.poll_action() {
            if let Action::Publish(p) = action
                && let Some(token) = p.token
            {
                tokens.push(token);
            }
            drained += 1;
            assert!(drained < 10_000, "actions never run out");
        }
        match (pick >> 4) & 3 {
            0 => tokens
                .drain(..)
                .for_each(|t| device.handle_published(now, t)),
            1 => tokens
                .drain(..)
                .for_each(|t| device.handle_publish_refused(now, t)),
            _ => {}
        }
        assert!(
            device.unacknowledged() <= capacity,
            "the outbox outgrew its bound"
        );
    }
});
