//! The virtual chip's non-volatile storage: a directory standing in for NVS and the key store.
//! Every write is atomic (temp file, fsync, rename, directory fsync), so a power cut leaves the old value or the
//! new one, never a torn file — the guarantee ESP-IDF's NVS gives.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_device_core::{Awaiting, BootedImage, Persist, Provisioning, Stored};
use flotilla_proto::{CommandReply, LedState, OtaOffer, OtaStatus};
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
    #[serde(default)]
    ota_outcome: Option<OtaStatus>,
    #[serde(default)]
    commands_done: Vec<CommandReply>,
}

impl From<Stored> for Record {
    fn from(s: Stored) -> Record {
        Record {
            provisioning: s.provisioning,
            unstable_boots: s.unstable_boots,
            seq_high_water: s.seq_high_water,
            led: s.led,
            brightness: s.brightness,
            ota_job: s.ota_job,
            ota_awaiting: s.ota_awaiting,
            ota_outcome: s.ota_outcome,
            commands_done: s.commands_done,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Nvs {
    dir: PathBuf,
}

pub const KEY_FILE: &str = "device.key";
pub const CERT_FILE: &str = "device.pem";
pub const CA_FILE: &str = "ca.pem";
/// A renewal's key and certificate until the device has connected with them. The key is
/// written first and removed last, so `next.pem` without `next.key` means a promotion was
/// cut half-way (the key already moved).
const NEXT_KEY_FILE: &str = "next.key";
const NEXT_CERT_FILE: &str = "next.pem";
/// Present while the server has not yet heard that the renewed certificate is in use.
const CONFIRM_FILE: &str = "renewal.confirm";

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Credentials {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Credentials {
    // The key never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}
const RECORD_FILE: &str = "nvs.json";
/// The download's resume offset: its own file, written by the download task while the
/// device task writes the record.
const OTA_OFFSET_FILE: &str = "ota.offset";

impl Nvs {
    pub fn open(dir: &Path) -> anyhow::Result<Nvs> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let nvs = Nvs {
            dir: dir.to_path_buf(),
        };
        nvs.finish_interrupted_renewal()?;
        Ok(nvs)
    }

    /// After a power cut: a promotion cut after the key moved is completed; a renewal cut
    /// before its certificate arrived is dropped (the next one makes a fresh key).
    fn finish_interrupted_renewal(&self) -> anyhow::Result<()> {
        let (key, cert) = (self.path(NEXT_KEY_FILE), self.path(NEXT_CERT_FILE));
        match (key.exists(), cert.exists()) {
            (false, true) => fs::rename(&cert, self.path(CERT_FILE))?,
            (true, false) => fs::remove_file(&key)?,
            _ => {}
        }
        Ok(())
    }

    /// The certificate the device connects with, and its key.
    pub fn credentials(&self) -> Option<Credentials> {
        Some(Credentials {
            cert: self.read_string(CERT_FILE)?,
            key: self.read_string(KEY_FILE)?,
        })
    }

    /// A renewed certificate not used yet.
    pub fn next_credentials(&self) -> Option<Credentials> {
        Some(Credentials {
            cert: self.read_string(NEXT_CERT_FILE)?,
            key: self.read_string(NEXT_KEY_FILE)?,
        })
    }

    /// The first half of a renewal: the fresh key, before its CSR leaves the device.
    pub fn store_next_key(&self, key_pem: &str) -> anyhow::Result<()> {
        self.write_atomic(NEXT_KEY_FILE, key_pem.as_bytes(), true)?;
        // Durable before the certificate can be: `next.pem` without `next.key` must only ever
        // mean a promotion cut half-way.
        self.sync_dir()
    }

    /// The second half: the certificate the server issued for it.
    pub fn store_next_cert(&self, cert_pem: &str) -> anyhow::Result<()> {
        if !self.path(NEXT_KEY_FILE).exists() {
            anyhow::bail!("no renewal key to go with the certificate");
        }
        self.write_atomic(NEXT_CERT_FILE, cert_pem.as_bytes(), false)
    }

    /// The device connected with the renewed certificate: it becomes the one it uses. Each
    /// step is one rename; [`Nvs::open`] completes a promotion cut half-way.
    pub fn promote_next(&self) -> anyhow::Result<()> {
        self.write_atomic(CONFIRM_FILE, b"", false)?;
        // Each rename made durable before the next, so a power cut cannot keep the second
        // and lose the first (the state `open` would read as a renewal cut short).
        fs::rename(self.path(NEXT_KEY_FILE), self.path(KEY_FILE))?;
        self.sync_dir()?;
        fs::rename(self.path(NEXT_CERT_FILE), self.path(CERT_FILE))?;
        self.sync_dir()?;
        Ok(())
    }

    /// Makes the directory's entries (renames, removals) durable.
    fn sync_dir(&self) -> anyhow::Result<()> {
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// The renewed certificate is not wanted (the server refuses it): certificate first, so a
    /// half-removed pair is never a promotion.
    pub fn discard_next(&self) {
        let _ = fs::remove_file(self.path(NEXT_CERT_FILE));
        let _ = self.sync_dir();
        let _ = fs::remove_file(self.path(NEXT_KEY_FILE));
    }

    pub fn confirm_pending(&self) -> bool {
        self.path(CONFIRM_FILE).exists()
    }

    pub fn confirmed(&self) {
        let _ = fs::remove_file(self.path(CONFIRM_FILE));
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
            ota_outcome: r.ota_outcome,
            commands_done: r.commands_done,
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
        if let Persist::ClearProvisioning = p {
            let _ = fs::remove_file(self.path(CERT_FILE));
            self.discard_next();
            self.confirmed();
        }
        let mut stored = self.load();
        stored.apply(p);
        let r = Record::from(stored);
        // The record holds the Wi-Fi password and the tokens: owner-only.
        self.write_atomic(RECORD_FILE, &serde_json::to_vec_pretty(&r)?, true)
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
        // The rename itself is durable only once the directory is.
        self.sync_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvs_with_renewal() -> (tempfile::TempDir, Nvs) {
        let dir = tempfile::tempdir().unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        nvs.write_atomic(KEY_FILE, b"old-key", true).unwrap();
        nvs.write_atomic(CERT_FILE, b"old-cert", false).unwrap();
        nvs.store_next_key("new-key").unwrap();
        nvs.store_next_cert("new-cert").unwrap();
        (dir, nvs)
    }

    fn pair(c: Option<Credentials>) -> Option<(String, String)> {
        c.map(|c| (c.cert, c.key))
    }

    #[test]
    fn a_promotion_cut_after_the_key_moved_is_completed_at_power_on() {
        let (dir, nvs) = nvs_with_renewal();
        // The power fails between promote_next's two renames.
        fs::rename(nvs.path(NEXT_KEY_FILE), nvs.path(KEY_FILE)).unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        assert_eq!(
            pair(nvs.credentials()),
            Some(("new-cert".into(), "new-key".into()))
        );
        assert!(nvs.next_credentials().is_none());
    }

    #[test]
    fn a_renewal_cut_before_its_certificate_leaves_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        nvs.write_atomic(KEY_FILE, b"old-key", true).unwrap();
        nvs.write_atomic(CERT_FILE, b"old-cert", false).unwrap();
        nvs.store_next_key("new-key").unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        assert_eq!(
            pair(nvs.credentials()),
            Some(("old-cert".into(), "old-key".into()))
        );
        assert!(!nvs.path(NEXT_KEY_FILE).exists());
        assert!(nvs.store_next_cert("orphan").is_err());
    }

    #[test]
    fn promotion_and_discard_leave_one_whole_pair() {
        let (dir, nvs) = nvs_with_renewal();
        nvs.promote_next().unwrap();
        assert!(nvs.confirm_pending());
        let nvs = Nvs::open(dir.path()).unwrap();
        assert_eq!(
            pair(nvs.credentials()),
            Some(("new-cert".into(), "new-key".into()))
        );
        nvs.confirmed();
        assert!(!nvs.confirm_pending());

        let (_dir, nvs) = nvs_with_renewal();
        nvs.discard_next();
        assert!(nvs.next_credentials().is_none());
        assert_eq!(
            pair(nvs.credentials()),
            Some(("old-cert".into(), "old-key".into()))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            nvs.store_next_key("k").unwrap();
            let mode = fs::metadata(nvs.path(NEXT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn the_record_holding_wifi_password_and_tokens_is_owner_only_and_the_key_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        // An older agent left the record world-readable.
        nvs.write_atomic(RECORD_FILE, b"{}", false).unwrap();
        nvs.apply(&Persist::Provisioning(Provisioning {
            ssid: "home".into(),
            password: "wifi-secret".into(),
            device_id: flotilla_proto::DeviceId::parse("dev-1").unwrap(),
            provisioning_token: "token-secret".into(),
            bearer_token: Some("bearer-secret".into()),
        }))
        .unwrap();
        assert!(
            nvs.read_string(RECORD_FILE)
                .unwrap()
                .contains("wifi-secret")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(nvs.path(RECORD_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let printed = format!(
            "{:?}",
            Credentials {
                cert: "the-cert".into(),
                key: "the-private-key".into(),
            }
        );
        assert!(printed.contains("the-cert") && !printed.contains("the-private-key"));
    }

    #[test]
    fn an_acknowledged_outcome_clears_only_its_own_update_and_commands_done_survive_a_reload() {
        use flotilla_proto::{CommandStatus, OtaPhase};
        let dir = tempfile::tempdir().unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        let failed = |id: &str| OtaStatus {
            status: OtaPhase::Failed,
            id: Some(id.into()),
            progress: None,
            version: Some("1.3.0".into()),
            error: Some("connection reset".into()),
        };
        nvs.apply(&Persist::OtaInstalled(Awaiting {
            id: "u2".into(),
            version: "1.4.0".into(),
        }))
        .unwrap();
        nvs.apply(&Persist::OtaOutcome(failed("u1"))).unwrap();
        let done = vec![CommandReply {
            id: "r1".into(),
            status: CommandStatus::Succeeded,
            result: Some(serde_json::json!({"rebooting": true})),
            error: None,
        }];
        nvs.apply(&Persist::CommandsDone(done.clone())).unwrap();
        // Another update's acknowledgement changes nothing.
        nvs.apply(&Persist::OtaReported { id: "u3".into() })
            .unwrap();
        let stored = nvs.load();
        assert_eq!(stored.ota_outcome, Some(failed("u1")));
        assert_eq!(
            stored.ota_awaiting.as_ref().map(|a| a.id.as_str()),
            Some("u2")
        );
        nvs.apply(&Persist::OtaReported { id: "u1".into() })
            .unwrap();
        let stored = Nvs::open(dir.path()).unwrap().load();
        assert_eq!(stored.ota_outcome, None);
        assert!(stored.ota_awaiting.is_some());
        assert_eq!(stored.commands_done, done);
        nvs.apply(&Persist::OtaReported { id: "u2".into() })
            .unwrap();
        assert!(nvs.load().ota_awaiting.is_none());
        // A rollback's outcome replaces its own awaiting record in the same write.
        nvs.apply(&Persist::OtaInstalled(Awaiting {
            id: "u4".into(),
            version: "1.5.0".into(),
        }))
        .unwrap();
        nvs.apply(&Persist::OtaOutcome(failed("u4"))).unwrap();
        let stored = nvs.load();
        assert!(stored.ota_awaiting.is_none());
        assert_eq!(stored.ota_outcome, Some(failed("u4")));
    }
}
