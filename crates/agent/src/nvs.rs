//! The virtual chip's non-volatile storage: a directory standing in for NVS and the key store.
//! Every write is atomic (temp file, fsync, rename), so a power cut leaves the old value or the
//! new one, never a torn file — the guarantee ESP-IDF's NVS gives.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_device_core::{Awaiting, BootedImage, Persist, Provisioning, Stored};
use flotilla_proto::{LedState, OtaOffer};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    provisioning: Option<Provisioning>,
    unstable_boots: u32,
    seq_high_water: u64,
    led: Option<LedState>,
    brightness: Option<u8>,
    #[serde(default)]
    ota_job: Option<OtaOffer>,
    #[serde(default)]
    ota_awaiting: Option<Awaiting>,
}

#[derive(Debug, Clone)]
pub struct Nvs {
    dir: PathBuf,
}

pub const KEY_FILE: &str = "device.key";
pub const CERT_FILE: &str = "device.pem";
pub const CA_FILE: &str = "ca.pem";
const RECORD_FILE: &str = "nvs.json";
/// The download's resume offset: its own file, written by the download task while the
/// device task writes the record.
const OTA_OFFSET_FILE: &str = "ota.offset";

impl Nvs {
    pub fn open(dir: &Path) -> anyhow::Result<Nvs> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Nvs {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn record(&self) -> Record {
        // A missing or unreadable record is a factory-fresh chip.
        fs::read(self.path(RECORD_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn load(&self) -> Stored {
        let r = self.record();
        Stored {
            provisioning: r.provisioning,
            has_certificate: self.path(CERT_FILE).exists()
                && self.path(KEY_FILE).exists()
                && self.path(CA_FILE).exists(),
            unstable_boots: r.unstable_boots,
            seq_high_water: r.seq_high_water,
            led: r.led,
            brightness: r.brightness,
            ota_job: r.ota_job,
            ota_awaiting: r.ota_awaiting,
            booted: BootedImage::Valid,
        }
    }

    pub fn ota_offset(&self) -> u64 {
        self.read_string(OTA_OFFSET_FILE)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn set_ota_offset(&self, offset: u64) -> anyhow::Result<()> {
        self.write_atomic(OTA_OFFSET_FILE, offset.to_string().as_bytes(), false)
    }

    pub fn apply(&self, p: &Persist) -> anyhow::Result<()> {
        let mut r = self.record();
        match p {
            Persist::Provisioning(prov) => r.provisioning = Some(prov.clone()),
            Persist::ClearProvisioning => {
                r.provisioning = None;
                let _ = fs::remove_file(self.path(CERT_FILE));
            }
            Persist::UnstableBoots(n) => r.unstable_boots = *n,
            Persist::SeqHighWater(n) => r.seq_high_water = *n,
            Persist::Led { state, brightness } => {
                r.led = Some(*state);
                r.brightness = Some(*brightness);
            }
            Persist::OtaJob(job) => r.ota_job = job.clone(),
            Persist::OtaInstalled(awaiting) => {
                r.ota_job = None;
                r.ota_awaiting = Some(awaiting.clone());
            }
            Persist::OtaReported => r.ota_awaiting = None,
        }
        self.write_atomic(RECORD_FILE, &serde_json::to_vec_pretty(&r)?, false)
    }

    pub fn read_string(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.path(name)).ok()
    }

    /// Atomic replace; `secret` files are created owner-only.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        }
        let mut f = options
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(name))?;
        Ok(())
    }
}
