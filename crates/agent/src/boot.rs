//! The virtual chip's bootloader: at every power-on it reads otadata from the flash file,
//! rolls back an image that stayed unconfirmed for too many boots, and boots the image in the
//! selected slot — whose header decides the version, hardware, security counter and behaviour
//! of everything that runs after.

use anyhow::Context;
use flotilla_device_core::slots::{Layout, MAX_UNCONFIRMED_BOOTS};
use flotilla_device_core::{BootedImage, Persist, Stored};

use crate::flash::{FLASH_FILE, FileFlash};
use crate::image::{self, ImageHeader};
use crate::nvs::Nvs;

/// The image this boot runs, and what NVS held.
pub struct Booted {
    pub header: ImageHeader,
    pub slot: usize,
    pub stored: Stored,
}

pub fn power_on(nvs: &Nvs, layout: &Layout, factory: &ImageHeader) -> anyhow::Result<Booted> {
    let mut flash = FileFlash::open(&nvs.path(FLASH_FILE), layout)?;
    let mut stored = nvs.load();
    // Never updated: slot 0 holds the factory image this build was flashed with.
    if layout.selection(&flash).is_none()
        && image::read(&flash, layout, 0).as_ref() != Some(factory)
    {
        image::flash_factory(&mut flash, layout, factory)?;
    }
    let outcome = layout
        .power_on(&mut flash, stored.unstable_boots, MAX_UNCONFIRMED_BOOTS)
        .map_err(|e| anyhow::anyhow!("otadata: {e:?}"))?;
    flash.sync()?;
    if outcome.rolled_back {
        tracing::warn!(
            boots = stored.unstable_boots,
            "new image never confirmed: rolled back to the previous slot"
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
    let header = image::read(&flash, layout, outcome.slot)
        .with_context(|| format!("slot {} holds no bootable image", outcome.slot))?;
    Ok(Booted {
        header,
        slot: outcome.slot,
        stored,
    })
}
