//! The device's side of an OTA update, as a part of the state machine:
//!
//! offer -> checks ([`crate::ota::verify_offer`]) -> STARTED -> download (the shell streams into
//! the inactive slot, resuming after a dropped link or a reboot) -> IN_PROGRESS(progress) ->
//! activate + reboot -> the new image boots on probation -> connected and stable for
//! `ota_confirm_ms` -> confirm -> SUCCESS. An image that never gets there reboots at
//! `ota_verify_deadline_ms`; the bootloader rolls it back once the crash counter reaches its
//! limit, and the previous image reports ROLLED_BACK.

use alloc::string::{String, ToString};

use flotilla_proto::{
    Channel, FirmwareVersion, OtaOffer, OtaPhase, OtaStatus, encode, truncate_chars,
};
use serde::{Deserialize, Serialize};

use super::{Action, Device, Millis, Persist};
use crate::ota::{Running, verify_offer};
use crate::outbox::Then;
use crate::slots::MAX_UNCONFIRMED_BOOTS;

/// An installed update whose outcome is still to be reported (kept in NVS across the reboot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Awaiting {
    pub id: String,
    pub version: String,
}

/// What the bootloader made of the running image at this boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BootedImage {
    /// A confirmed image (or the factory one).
    #[default]
    Valid,
    /// A new image on probation: confirm it after the health check.
    PendingVerify,
    /// The bootloader gave the selected image up (never confirmed, or its slot did not
    /// verify); the other slot's is running.
    RolledBack,
}

#[derive(Debug, Default)]
pub(super) struct OtaFlow {
    job: Option<OtaOffer>,
    /// Size of the job's image, for progress.
    size: u64,
    downloading: bool,
    last_progress: u8,
    awaiting: Option<Awaiting>,
    booted: BootedImage,
}

impl Device {
    /// Whether an update is being downloaded or waits for confirmation.
    pub fn ota_busy(&self) -> bool {
        self.ota.job.is_some() || self.ota.booted == BootedImage::PendingVerify
    }

    /// Bytes of the image received so far (the shell counts; this only reports).
    pub fn handle_ota_progress(&mut self, _now: Millis, received: u64) {
        let Some(job) = &self.ota.job else { return };
        let percent = (received.saturating_mul(100) / self.ota.size.max(1)).min(99) as u8;
        // One report per 10%: enough for a progress bar, little enough for a fleet.
        if percent / 10 > self.ota.last_progress / 10 {
            self.ota.last_progress = percent;
            let status = in_progress(job, percent);
            self.publish_ota(status);
        }
    }

    /// The shell finished streaming: `Ok` once size and hash matched, or why it failed.
    pub fn handle_ota_finished(&mut self, _now: Millis, result: Result<(), String>) {
        let Some(job) = self.ota.job.take() else {
            return;
        };
        self.ota.downloading = false;
        let version = offered_version(&job);
        match result {
            Ok(()) => {
                self.publish_ota(in_progress(&job, 100));
                let awaiting = Awaiting {
                    id: job.id,
                    version,
                };
                self.persist(Persist::OtaInstalled(awaiting));
                // The new image starts with a clean crash counter.
                self.persist(Persist::UnstableBoots(0));
                self.actions.push_back(Action::ActivateImage);
                self.actions.push_back(Action::Reboot);
            }
            Err(error) => self.job_failed(&job, &error),
        }
    }

    pub(super) fn ota_boot(
        &mut self,
        now: Millis,
        job: Option<OtaOffer>,
        awaiting: Option<Awaiting>,
        booted: BootedImage,
    ) {
        self.ota.job = job;
        self.ota.awaiting = awaiting;
        self.ota.booted = booted;
        if booted == BootedImage::PendingVerify {
            self.timers.ota_deadline = Some(now + self.config.ota_verify_deadline_ms);
        }
        if booted == BootedImage::RolledBack
            && let Some(a) = self.ota.awaiting.take()
        {
            // Only this boot knows the image was rolled back: the outcome goes to NVS in
            // place of the awaiting record (one write), so a reboot before its PUBACK
            // reports ROLLED_BACK again, not a FAILED guessed from the version.
            let status = OtaStatus {
                status: OtaPhase::RolledBack,
                id: Some(a.id),
                progress: None,
                version: Some(a.version),
                error: Some(alloc::format!(
                    "the bootloader gave the image up (not confirmed within {MAX_UNCONFIRMED_BOOTS} boots, or its slot did not verify); previous image restored"
                )),
            };
            self.persist(Persist::OtaOutcome(status.clone()));
            self.send_ota_outcome(status);
        }
    }

    pub(super) fn ota_connected(&mut self, now: Millis) {
        match self.ota.booted {
            BootedImage::PendingVerify => {
                self.timers.ota_confirm = Some(now + self.config.ota_confirm_ms);
            }
            // Its outcome was queued at boot.
            BootedImage::RolledBack => self.ota.booted = BootedImage::Valid,
            BootedImage::Valid => {
                // A power cut between install and activation, or between confirmation and
                // its report: the running version tells which.
                if let Some(a) = self.ota.awaiting.take() {
                    let done = a.version == self.config.firmware_version;
                    self.send_ota_outcome(OtaStatus {
                        status: if done {
                            OtaPhase::Success
                        } else {
                            OtaPhase::Failed
                        },
                        id: Some(a.id),
                        progress: None,
                        version: Some(a.version),
                        error: (!done).then(|| "interrupted before activation".to_string()),
                    });
                }
            }
        }
        if let Some(job) = self.ota.job.clone()
            && !self.ota.downloading
        {
            // Re-check after the reboot: the running image or the clock may have changed.
            self.ota.job = None;
            self.start_job(now, job, true);
        }
    }

    pub(super) fn ota_offer(&mut self, now: Millis, offer: OtaOffer) {
        if self.ota.job.as_ref().is_some_and(|j| j.id == offer.id) {
            return; // a redelivery of the offer in progress
        }
        let busy = if self.ota.booted == BootedImage::PendingVerify {
            Some("the running update is not confirmed yet")
        } else if self.ota.job.is_some() {
            Some("another update is in progress")
        } else {
            None
        };
        if let Some(reason) = busy {
            self.report_failed(&offer, reason);
            return;
        }
        self.start_job(now, offer, false);
    }

    /// The server withdrew offer `id`. Only its download stops (reported FAILED): an image
    /// already installed is past recall, and its outcome (SUCCESS or ROLLED_BACK) follows.
    pub(super) fn ota_cancel(&mut self, id: &str) {
        let Some(job) = self.ota.job.take_if(|j| j.id == id) else {
            return;
        };
        if self.ota.downloading {
            self.actions.push_back(Action::CancelDownload);
        }
        self.ota.downloading = false;
        self.job_failed(&job, "cancelled by the server");
    }

    fn start_job(&mut self, now: Millis, offer: OtaOffer, resume: bool) {
        let version: FirmwareVersion =
            self.config
                .firmware_version
                .parse()
                .unwrap_or(FirmwareVersion {
                    major: 0,
                    minor: 0,
                    patch: 0,
                });
        let running = Running {
            hardware: &self.config.hardware,
            version,
            security_counter: self.config.security_counter,
            now: self.unix_ms(now).map(|ms| ms / 1000),
        };
        let checked = verify_offer(
            &offer.manifest,
            &self.config.trusted_keys,
            &running,
            offer.force,
        )
        .and_then(|m| {
            if m.size > self.config.slot_size {
                Err(crate::ota::OtaRejection::TooLargeForSlot)
            } else {
                Ok(m)
            }
        });
        let manifest = match checked {
            Ok(m) => m,
            Err(rejection) => {
                if resume {
                    self.job_failed(&offer, rejection.reason());
                } else {
                    self.report_failed(&offer, rejection.reason());
                }
                return;
            }
        };
        if !resume {
            self.persist(Persist::OtaJob(Some(offer.clone())));
            self.publish_ota(OtaStatus {
                status: OtaPhase::Started,
                id: Some(offer.id.clone()),
                progress: None,
                version: Some(manifest.version.clone()),
                error: None,
            });
        }
        self.ota.size = manifest.size;
        self.ota.last_progress = 0;
        self.ota.downloading = true;
        self.ota.job = Some(offer.clone());
        self.actions.push_back(Action::Download {
            offer,
            manifest,
            resume,
        });
    }

    pub(super) fn ota_confirm(&mut self) {
        if self.ota.booted != BootedImage::PendingVerify {
            return;
        }
        self.ota.booted = BootedImage::Valid;
        self.timers.ota_deadline = None;
        self.actions.push_back(Action::ConfirmImage);
        // The awaiting record stays in NVS until the broker has the SUCCESS: a power cut
        // before that reports it again from the confirmed image.
        let awaiting = self.ota.awaiting.take();
        self.send_ota_outcome(OtaStatus {
            status: OtaPhase::Success,
            id: awaiting.map(|a| a.id),
            progress: None,
            version: Some(self.config.firmware_version.clone()),
            error: None,
        });
    }

    /// The new image never passed its health check in time: restart it. The crash counter
    /// grows with every such boot until the bootloader rolls back.
    pub(super) fn ota_deadline_passed(&mut self) {
        if self.ota.booted == BootedImage::PendingVerify {
            self.actions.push_back(Action::Reboot);
        }
    }

    /// FAILED for an offer the device never took on (busy, refused by its checks), with
    /// why: it must arrive, but only while this boot lasts (the server offers again).
    fn report_failed(&mut self, offer: &OtaOffer, error: &str) {
        let status = failed(offer, error);
        self.publish_reliably(Channel::OtaStatus, encode(&status), Then::Nothing);
    }

    /// FAILED for the device's own job (persisted, perhaps downloading): forgotten and its
    /// outcome kept in one NVS write, so the outcome arrives even after a reboot.
    fn job_failed(&mut self, job: &OtaOffer, error: &str) {
        let status = failed(job, error);
        self.persist(Persist::OtaOutcome(status.clone()));
        self.send_ota_outcome(status);
    }

    /// A final outcome (SUCCESS, ROLLED_BACK, FAILED): it must arrive, and once it did the
    /// persisted record of it is dropped ([`Persist::OtaReported`]).
    pub(super) fn send_ota_outcome(&mut self, status: OtaStatus) {
        let then = match &status.id {
            Some(id) => Then::OtaReported(id.clone()),
            None => Then::Nothing,
        };
        self.publish_reliably(Channel::OtaStatus, encode(&status), then);
    }

    fn publish_ota(&mut self, status: OtaStatus) {
        self.publish(Channel::OtaStatus, encode(&status), false);
    }
}

fn failed(offer: &OtaOffer, error: &str) -> OtaStatus {
    OtaStatus {
        status: OtaPhase::Failed,
        id: Some(offer.id.clone()),
        progress: None,
        version: Some(offered_version(offer)),
        error: Some(truncate_chars(error, 200).to_string()),
    }
}

fn in_progress(job: &OtaOffer, percent: u8) -> OtaStatus {
    OtaStatus {
        status: OtaPhase::InProgress,
        id: Some(job.id.clone()),
        progress: Some(percent),
        version: Some(offered_version(job)),
        error: None,
    }
}

/// The version an offer claims, for reports (read without trusting it).
fn offered_version(offer: &OtaOffer) -> String {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: String,
    }
    serde_json::from_str::<VersionOnly>(&offer.manifest.manifest)
        .map(|v| truncate_chars(&v.version, 32).to_string())
        .unwrap_or_default()
}
