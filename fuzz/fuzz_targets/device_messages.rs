//! device-core's message handling: a connected device fed arbitrary messages on its topics
//! never panics, and every action it asks for can be drained.
#![no_main]

use flotilla_device_core::{Config, Device, Provisioning, Stored};
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
    // Messages are separated by 0xff; the first byte of each picks its topic.
    for chunk in data.split(|b| *b == 0xff) {
        let Some((pick, payload)) = chunk.split_first() else {
            continue;
        };
        device.handle_message(now, TOPICS[*pick as usize % TOPICS.len()], payload);
        now += 10;
        device.handle_timeout(now);
        let mut drained = 0;
        while device.poll_action().is_some() {
            drained += 1;
            assert!(drained < 10_000, "actions never run out");
        }
    }
});
