//! The simulated shell shared by the device-core tests: records what the device asked for and
//! lets the test answer, in simulated time.

#![allow(dead_code)] // each test file uses a different part

use flotilla_device_core::ota::to_hex;
use flotilla_device_core::{Action, Config, Device, Millis, Provisioning, State, Stored, Token};
use flotilla_proto::{
    Command, CommandReply, DeviceId, FirmwareManifest, SignedManifest, decode, encode,
};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

/// A simulated shell: records what the device asked for and lets the test answer.
pub struct Sim {
    pub device: Device,
    pub now: Millis,
    pub log: Vec<Action>,
    pub transitions: Vec<State>,
    /// The broker acknowledges every message that must arrive as soon as it is published
    /// (a link that never drops). Off: tokens wait in `unacked` for the test.
    pub auto_ack: bool,
    /// Tokens of messages handed over and not acknowledged, oldest first.
    pub unacked: Vec<Token>,
}

impl Sim {
    pub fn boot(config: Config, stored: Stored) -> Sim {
        Sim::boot_with_seed(config, stored, 7)
    }

    /// [`Sim::boot`] with the device's random seed given (devices of a fleet differ).
    pub fn boot_with_seed(config: Config, stored: Stored, seed: u64) -> Sim {
        let mut sim = Sim {
            device: Device::new(config, seed),
            now: 0,
            log: Vec::new(),
            transitions: Vec::new(),
            auto_ack: true,
            unacked: Vec::new(),
        };
        sim.device.handle_boot(0, stored);
        sim.drain();
        sim
    }

    pub fn drain(&mut self) {
        loop {
            while let Some(a) = self.device.poll_action() {
                if let Action::Publish(p) = &a
                    && let Some(token) = p.token
                {
                    self.unacked.push(token);
                }
                self.log.push(a);
            }
            while let Some(s) = self.device.poll_transition() {
                self.transitions.push(s);
            }
            if !self.auto_ack || self.unacked.is_empty() {
                return;
            }
            for token in std::mem::take(&mut self.unacked) {
                self.device.handle_published(self.now, token);
            }
        }
    }

    /// The broker acknowledges every message handed over so far.
    pub fn acknowledge(&mut self) {
        for token in std::mem::take(&mut self.unacked) {
            self.device.handle_published(self.now, token);
        }
        self.drain();
    }

    /// The link drops (nothing handed over is acknowledged) and comes back.
    pub fn reconnect(&mut self) {
        self.unacked.clear();
        self.device.handle_mqtt_disconnected(self.now);
        self.drain();
        self.device.handle_mqtt_connected(self.now);
        self.drain();
    }

    /// Advances simulated time to `until`, firing every timeout on the way.
    pub fn run_until(&mut self, until: Millis) {
        while let Some(t) = self.device.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            self.device.handle_timeout(self.now);
            self.drain();
        }
        self.now = until;
    }

    /// The last OTA outcome the device persisted (`Persist::OtaOutcome`).
    pub fn stored_outcome(&self) -> Option<flotilla_proto::OtaStatus> {
        self.log.iter().rev().find_map(|a| match a {
            Action::Persist(flotilla_device_core::Persist::OtaOutcome(o)) => Some(o.clone()),
            _ => None,
        })
    }

    pub fn take_log(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.log)
    }

    pub fn published(&mut self, suffix: &str) -> Vec<Vec<u8>> {
        self.log
            .iter()
            .filter_map(|a| match a {
                Action::Publish(p) if p.topic.ends_with(suffix) => Some(p.payload.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn replies(&mut self) -> Vec<CommandReply> {
        self.published("/reply")
            .iter()
            .map(|p| decode(p).unwrap())
            .collect()
    }

    pub fn connected(config: Config) -> Sim {
        let stored = Stored {
            provisioning: Some(provisioning()),
            has_certificate: true,
            ..Stored::default()
        };
        let mut sim = Sim::boot(config, stored);
        sim.device.handle_wifi_connected(0);
        sim.drain();
        sim.device.handle_mqtt_connected(0);
        sim.drain();
        sim.device.handle_wall_clock(0, 1_000_000_000_000);
        sim.take_log();
        sim
    }

    pub fn command(&mut self, id: &str, name: &str, args: serde_json::Value) {
        let c = Command {
            id: id.into(),
            name: name.into(),
            args,
            expires_at: 2_000_000_000,
        };
        self.device
            .handle_message(self.now, "devices/dev-1/command", &encode(&c));
        self.drain();
    }
}

pub fn provisioning() -> Provisioning {
    Provisioning {
        ssid: "HomeNet".into(),
        password: "secret123".into(),
        device_id: DeviceId::parse("dev-1").unwrap(),
        provisioning_token: "tok".into(),
        bearer_token: None,
    }
}

// ----- releases -----

/// How long a new image must stay connected before it is confirmed, in these tests.
pub const CONFIRM_MS: u64 = 5_000;
/// When a new image that never confirms reboots, in these tests.
pub const DEADLINE_MS: u64 = 60_000;

/// A device running `version` that trusts releases signed by `key(1)`.
pub fn ota_config(version: &str) -> Config {
    Config {
        firmware_version: version.into(),
        security_counter: 3,
        trusted_keys: vec![*key(1).verifying_key()],
        ota_confirm_ms: CONFIRM_MS,
        ota_verify_deadline_ms: DEADLINE_MS,
        ..Config::default()
    }
}

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32].into()).unwrap()
}

pub fn manifest(version: &str, image: &[u8]) -> FirmwareManifest {
    FirmwareManifest {
        version: version.into(),
        hardware: "esp32c3".into(),
        size: image.len() as u64,
        sha256: to_hex(&Sha256::digest(image)),
        security_counter: 3,
        issued_at: 1_800_000_000,
        expires_at: Some(1_900_000_000),
    }
}

pub fn sign(key: &SigningKey, m: &FirmwareManifest) -> SignedManifest {
    let text = serde_json::to_string(m).unwrap();
    let sig: Signature = key.sign(text.as_bytes());
    SignedManifest {
        manifest: text,
        signature: to_hex(&sig.to_bytes()),
    }
}
