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

// ----- flash -----

/// Plain NOR flash in RAM (4 KiB erase blocks, 4-byte writes), without power cuts.
pub struct RamFlash(pub Vec<u8>);

impl RamFlash {
    pub fn new(len: usize) -> Self {
        RamFlash(vec![0xFF; len])
    }
}

impl flotilla_device_core::slots::Flash for RamFlash {
    const ERASE_BLOCK: usize = 4096;
    const WRITE_ALIGN: usize = 4;

    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.0[offset..offset + buf.len()]);
    }

    fn erase(&mut self, offset: usize) -> Result<(), flotilla_device_core::slots::FlashError> {
        self.0[offset..offset + 4096].fill(0xFF);
        Ok(())
    }

    fn write(
        &mut self,
        offset: usize,
        data: &[u8],
    ) -> Result<(), flotilla_device_core::slots::FlashError> {
        self.0[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// How a power cut meets the flash operation it interrupts: nothing of it done, or part of it
/// (the first `done` words of a write, the first `done` quarters of an erase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The number of the operation cut (0 = the first after [`CutFlash::arm`]).
    pub op: usize,
    pub done: usize,
}

/// NOR flash with erase blocks, write alignment, no writes to unerased bytes, and a power cut
/// at one operation ([`Cut`]). It records the length of every operation, so a test can list
/// the cuts worth trying ([`CutFlash::cuts`]).
#[derive(Clone)]
pub struct CutFlash {
    pub mem: Vec<u8>,
    pub ops: usize,
    pub cut: Option<Cut>,
    /// For each operation since the last [`CutFlash::arm`]: how many shapes of tear it has
    /// (write: its words; erase: 4 quarters).
    pub units: Vec<usize>,
}

pub const CUT_BLOCK: usize = 4096;
const WORD: usize = 4;

impl CutFlash {
    pub fn new(len: usize) -> Self {
        CutFlash {
            mem: vec![0xFF; len],
            ops: 0,
            cut: None,
            units: Vec::new(),
        }
    }

    /// Starts counting operations from here; `cut` the one to interrupt.
    pub fn arm(&mut self, cut: Option<Cut>) {
        self.ops = 0;
        self.cut = cut;
        self.units.clear();
    }

    /// Every distinct cut of the operations recorded: before each, and torn after a quarter,
    /// a half and three quarters of it (rounded to whole words, never the whole operation).
    pub fn cuts(&self) -> Vec<Cut> {
        let mut cuts = Vec::new();
        for (op, &units) in self.units.iter().enumerate() {
            let mut done: Vec<usize> = [
                0,
                units.div_ceil(4),
                units.div_ceil(2),
                (3 * units).div_ceil(4),
            ]
            .into_iter()
            .map(|d| d.min(units.saturating_sub(1)))
            .collect();
            done.dedup();
            cuts.extend(done.into_iter().map(|done| Cut { op, done }));
        }
        cuts
    }

    /// Counts the operation; the share of it done before the power went, if this is the cut.
    fn tick(&mut self, units: usize) -> Option<usize> {
        self.units.push(units);
        let op = self.ops;
        self.ops += 1;
        self.cut.filter(|c| c.op == op).map(|c| c.done)
    }
}

impl flotilla_device_core::slots::Flash for CutFlash {
    const ERASE_BLOCK: usize = CUT_BLOCK;
    const WRITE_ALIGN: usize = WORD;

    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.mem[offset..offset + buf.len()]);
    }

    fn erase(&mut self, offset: usize) -> Result<(), flotilla_device_core::slots::FlashError> {
        use flotilla_device_core::slots::FlashError;
        if !offset.is_multiple_of(CUT_BLOCK) || offset + CUT_BLOCK > self.mem.len() {
            return Err(FlashError::Misaligned);
        }
        if let Some(quarters) = self.tick(4) {
            self.mem[offset..offset + quarters * CUT_BLOCK / 4].fill(0xFF);
            return Err(FlashError::PowerLost);
        }
        self.mem[offset..offset + CUT_BLOCK].fill(0xFF);
        Ok(())
    }

    fn write(
        &mut self,
        offset: usize,
        data: &[u8],
    ) -> Result<(), flotilla_device_core::slots::FlashError> {
        use flotilla_device_core::slots::FlashError;
        if !offset.is_multiple_of(WORD)
            || !data.len().is_multiple_of(WORD)
            || offset + data.len() > self.mem.len()
        {
            return Err(FlashError::Misaligned);
        }
        if self.mem[offset..offset + data.len()]
            .iter()
            .any(|b| *b != 0xFF)
        {
            return Err(FlashError::NotErased);
        }
        let torn = self.tick(data.len() / WORD);
        let n = torn.map_or(data.len(), |words| words * WORD);
        self.mem[offset..offset + n].copy_from_slice(&data[..n]);
        match torn {
            Some(_) => Err(FlashError::PowerLost),
            None => Ok(()),
        }
    }
}
