//! The virtual chip's bootloader: at every power-on it reads otadata from the flash file,
//! rolls back an image that stayed unconfirmed for too many boots, and boots the image in the
//! selected slot — whose header decides the version, hardware, security counter and behaviour
//! of everything that runs after. (On the ESP32-C3 this is the ROM and ESP-IDF's second-stage
//! bootloader; the app's side of the slots is device-core's `OtaSlots` on both.)

use anyhow::Context;
use flotilla_device_core::otadata::Layout;
use flotilla_device_core::slots::{FlashError, ImageState, MAX_UNCONFIRMED_BOOTS, OtaSlots};
use flotilla_device_core::{BootedImage, Persist, Stored};

use crate::flash::{self, FLASH_FILE};
use crate::image::{self, ImageHeader};
use crate::nvs::Nvs;

/// The image this boot runs, and what NVS held.
pub struct Booted {
    pub header: ImageHeader,
    pub slot: usize,
    pub stored: Stored,
}

/// What the bootloader decided at power-on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootOutcome {
    pub slot: usize,
    /// The image runs on probation: the app must confirm it after its health check.
    pub pending_verify: bool,
    /// An unconfirmed image was given up and the previous slot booted instead.
    pub rolled_back: bool,
}

/// The bootloader's decisions: an image still on probation (PENDING_VERIFY) after
/// `max_unconfirmed_boots` boots that never became stable (the crash counter the app keeps in
/// NVS) is rolled back first; then a NEW image goes on probation, and the selected slot boots.
pub fn bootloader<S: OtaSlots>(
    slots: &mut S,
    unstable_boots: u32,
    max_unconfirmed_boots: u32,
) -> Result<BootOutcome, FlashError> {
    let on_probation = |s: &S| s.running_state() == Some(ImageState::PendingVerify);
    let rolled_back = on_probation(slots) && unstable_boots >= max_unconfirmed_boots;
    if rolled_back {
        slots.roll_back()?;
    }
    if slots.running_state() == Some(ImageState::New) {
        slots.set_running_state(ImageState::PendingVerify)?;
    }
    Ok(BootOutcome {
        slot: slots.running_slot(),
        pending_verify: on_probation(slots),
        rolled_back,
    })
}

pub fn power_on(nvs: &Nvs, layout: &Layout, factory: &ImageHeader) -> anyhow::Result<Booted> {
    let mut ota = flash::open_slots(&nvs.path(FLASH_FILE), layout)?;
    let mut stored = nvs.load();
    // Never updated: slot 0 holds the factory image this build was flashed with. Entries that
    // are there but not valid leave a bootable slot 0 as it is, which ESP-IDF then boots.
    let slot0 = image::read(ota.flash(), layout, 0);
    let factory_due = if ota.is_blank() {
        slot0.as_ref() != Some(factory)
    } else {
        ota.selection().is_none() && slot0.is_none()
    };
    if factory_due {
        image::flash_factory(ota.flash_mut(), layout, factory)?;
    }
    let mut outcome = bootloader(&mut ota, stored.unstable_boots, MAX_UNCONFIRMED_BOOTS)
        .map_err(|e| anyhow::anyhow!("otadata: {e:?}"))?;
    // The selected slot does not verify: boot the other one, as ESP-IDF's bootloader falls
    // back to another slot that loads. Unlike ESP-IDF (which leaves otadata as it is), select
    // it (VALID: it ran before, or is the factory image), because the app takes the slot not
    // selected as the one to write the next image to, and that must not be the one running.
    let other = 1 - outcome.slot;
    let mut header = image::read(ota.flash(), layout, outcome.slot);
    if header.is_none()
        && let Some(fallback) = image::read(ota.flash(), layout, other)
    {
        tracing::error!(
            slot = outcome.slot,
            "the selected slot holds no bootable image: booting slot {other}"
        );
        ota.roll_back()
            .map_err(|e| anyhow::anyhow!("otadata: {e:?}"))?;
        outcome = BootOutcome {
            slot: ota.running_slot(),
            pending_verify: false,
            rolled_back: true,
        };
        header = Some(fallback);
    }
    let flash = ota.into_flash();
    flash.sync()?;
    if outcome.rolled_back {
        tracing::warn!(
            boots = stored.unstable_boots,
            slot = outcome.slot,
            "the selected image was given up (never confirmed, or its slot did not verify): booting the other slot"
        );
        nvs.apply(&Persist::UnstableBoots(0))?;
        stored.unstable_boots = 0;
    }
    stored.booted = if outcome.rolled_back {
        BootedImage::RolledBack
    } else if outcome.pending_verify {
        BootedImage::PendingVerify
    } else {
        BootedImage::Valid
    };
    let header =
        header.with_context(|| format!("slot {} holds no bootable image", outcome.slot))?;
    Ok(Booted {
        header,
        slot: outcome.slot,
        stored,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use flotilla_device_core::slots::Flash;

    /// otadata selects a slot whose bytes do not verify (here written behind the installer's
    /// back, as a worn or corrupted flash would): the chip boots the other slot, selects it,
    /// and the update is reported as rolled back, never a chip that cannot boot.
    #[test]
    fn a_selected_slot_that_does_not_verify_boots_the_other_one() {
        let dir = tempfile::tempdir().unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        let layout = flash::layout(64 * 1024);
        let factory = ImageHeader {
            version: "1.0.0".into(),
            hardware: "esp32c3".into(),
            security_counter: 0,
            behaviour: Default::default(),
        };
        assert_eq!(power_on(&nvs, &layout, &factory).unwrap().slot, 0);
        {
            let mut ota = flash::open_slots(&nvs.path(FLASH_FILE), &layout).unwrap();
            let at = layout.slots[1];
            ota.flash_mut().erase(at).unwrap();
            ota.flash_mut().write(at, &[0xE9; 64]).unwrap();
            ota.activate_next().unwrap();
            ota.flash().sync().unwrap();
        }
        for reported in [BootedImage::RolledBack, BootedImage::Valid] {
            let booted = power_on(&nvs, &layout, &factory).unwrap();
            assert_eq!((booted.slot, &booted.header), (0, &factory));
            assert_eq!(booted.stored.booted, reported);
        }
        let ota = flash::open_slots(&nvs.path(FLASH_FILE), &layout).unwrap();
        assert_eq!(ota.running_slot(), 0, "slot 0 is selected again");
    }

    /// Both otadata entries given up (INVALID, ABORTED), slot 0 holding an image other than
    /// the factory one: not a chip never updated, so slot 0 boots as it is (as ESP-IDF boots
    /// `ota_0`), never overwritten with the factory image.
    #[test]
    fn entries_all_given_up_leave_slot_0_as_it_is() {
        use flotilla_device_core::otadata::encode_entry;
        let dir = tempfile::tempdir().unwrap();
        let nvs = Nvs::open(dir.path()).unwrap();
        let layout = flash::layout(64 * 1024);
        let header = |version: &str| ImageHeader {
            version: version.into(),
            hardware: "esp32c3".into(),
            security_counter: 0,
            behaviour: Default::default(),
        };
        let (factory, later) = (header("1.0.0"), header("1.5.0"));
        power_on(&nvs, &layout, &factory).unwrap();
        {
            let mut ota = flash::open_slots(&nvs.path(FLASH_FILE), &layout).unwrap();
            let f = ota.flash_mut();
            for block in 0..2 {
                f.erase(layout.slots[0] + block * 4096).unwrap();
            }
            let mut image = crate::image::build(&later, 6000).unwrap();
            image.resize(image.len().div_ceil(4) * 4, 0xFF);
            f.write(layout.slots[0], &image).unwrap();
            for (i, state) in [ImageState::Invalid, ImageState::Aborted]
                .into_iter()
                .enumerate()
            {
                f.erase(layout.otadata + i * 4096).unwrap();
                f.write(
                    layout.otadata + i * 4096,
                    &encode_entry(i as u32 + 1, state),
                )
                .unwrap();
            }
            f.sync().unwrap();
        }
        let booted = power_on(&nvs, &layout, &factory).unwrap();
        assert_eq!((booted.slot, &booted.header), (0, &later));
    }
}

#[cfg(test)]
mod cut_flash;
#[cfg(test)]
mod power_loss;
