//! Streams an image into the inactive slot in bounded memory: erases the blocks the image will
//! occupy, writes chunks at
//! the flash's write alignment, checks size and SHA-256 as bytes arrive, and can resume after a
//! dropped link or a reboot from the last offset it reported as flushed.
//!
//! The caller persists [`SlotWriter::flushed`] (never more) as its resume offset. On resume the
//! bytes already in flash are hashed again — the hasher's state does not survive a reboot — and
//! the erase block holding the offset is erased again, since a torn write may have touched it.

use flotilla_proto::FirmwareManifest;

use crate::app_image::{self, CHIP_ID_ESP32C3};
use crate::ota::{ImageCheck, OtaRejection};
use crate::slots::{FlashError, OtaSlots};

/// Why writing an image stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallError {
    Rejected(OtaRejection),
    Flash(FlashError),
}

impl From<OtaRejection> for InstallError {
    fn from(r: OtaRejection) -> Self {
        InstallError::Rejected(r)
    }
}

impl From<FlashError> for InstallError {
    fn from(e: FlashError) -> Self {
        InstallError::Flash(e)
    }
}

/// Bytes held back until a whole write-aligned unit is available.
const TAIL: usize = 16;

/// An image being written to the slot the next image goes to ([`OtaSlots`]'s `*_next`).
#[derive(Debug, Clone)]
pub struct SlotWriter {
    flushed: usize,
    tail: [u8; TAIL],
    tail_len: usize,
    check: ImageCheck,
    /// What the image must be ([`check_app_image`]).
    manifest: FirmwareManifest,
}

impl SlotWriter {
    /// Starts a fresh install: erases the blocks of the next slot the image will occupy (as
    /// ESP-IDF's `esp_ota_begin` does when told the image size; the rest of the slot is left
    /// as it was, sparing the flash an erase of blocks no byte of the image reaches).
    pub fn begin<S: OtaSlots>(
        slots: &mut S,
        manifest: &FirmwareManifest,
    ) -> Result<SlotWriter, InstallError> {
        let writer = Self::new(slots, manifest)?;
        (0..image_blocks::<S>(manifest)).try_for_each(|i| slots.erase_next(i * S::ERASE_BLOCK))?;
        Ok(writer)
    }

    /// Continues an install whose first `offset` bytes were flushed earlier. Returns the writer
    /// and the offset it really resumes from (rounded down to an erase block), which is where
    /// the download must continue.
    pub fn resume<S: OtaSlots>(
        slots: &mut S,
        manifest: &FirmwareManifest,
        offset: u64,
    ) -> Result<(SlotWriter, u64), InstallError> {
        let mut writer = Self::new(slots, manifest)?;
        let offset = usize::try_from(offset.min(manifest.size))
            .unwrap_or(0)
            .min(slots.slot_len());
        let start = offset - offset % S::ERASE_BLOCK;
        let mut buf = [0u8; 256];
        let mut at = 0;
        while at < start {
            let n = buf.len().min(start - at);
            slots.read_next(at, &mut buf[..n]);
            writer.check.update(&buf[..n])?;
            at += n;
        }
        // The image's blocks from `start` on may hold a torn write: erase any not blank.
        let mut block = start;
        while block < image_blocks::<S>(manifest) * S::ERASE_BLOCK {
            if !is_blank(slots, block, S::ERASE_BLOCK) {
                slots.erase_next(block)?;
            }
            block += S::ERASE_BLOCK;
        }
        writer.flushed = start;
        Ok((writer, start as u64))
    }

    fn new<S: OtaSlots>(
        slots: &S,
        manifest: &FirmwareManifest,
    ) -> Result<SlotWriter, InstallError> {
        if manifest.size > slots.slot_len() as u64 {
            return Err(OtaRejection::TooLargeForSlot.into());
        }
        Ok(SlotWriter {
            flushed: 0,
            tail: [0xFF; TAIL],
            tail_len: 0,
            check: ImageCheck::new(manifest)?,
            manifest: manifest.clone(),
        })
    }

    /// Bytes durably written: the offset to persist for a resume.
    pub fn flushed(&self) -> u64 {
        self.flushed as u64
    }

    /// Bytes accepted so far (flushed plus held back).
    pub fn received(&self) -> u64 {
        self.check.received()
    }

    /// Writes the next chunk; refuses it whole if it would exceed the declared size.
    pub fn write<S: OtaSlots>(
        &mut self,
        slots: &mut S,
        mut chunk: &[u8],
    ) -> Result<(), InstallError> {
        self.check.update(chunk)?;
        let align = S::WRITE_ALIGN.min(TAIL);
        // Complete a held-back unit first.
        if self.tail_len > 0 {
            let take = (align - self.tail_len).min(chunk.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&chunk[..take]);
            self.tail_len += take;
            chunk = &chunk[take..];
            if self.tail_len < align {
                return Ok(());
            }
            slots.write_next(self.flushed, &self.tail[..align])?;
            self.flushed += align;
            self.tail_len = 0;
        }
        let whole = chunk.len() - chunk.len() % align;
        if whole > 0 {
            slots.write_next(self.flushed, &chunk[..whole])?;
            self.flushed += whole;
        }
        let rest = &chunk[whole..];
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
        Ok(())
    }

    /// Writes the held-back bytes (padded with 0xFF), checks size and hash, then reads the
    /// image back from the slot within the bytes the manifest vouches for, as the bootloader
    /// will (header, chip id, segments, checksum, appended SHA-256), and checks that its app
    /// descriptor says what the manifest says. Only after this succeeds may the slot be
    /// activated: a signed file that is not a bootable image would leave the chip nothing to
    /// boot. A refused image's first block is erased, so no fallback ever boots it.
    pub fn finish<S: OtaSlots>(mut self, slots: &mut S) -> Result<(), InstallError> {
        if self.tail_len > 0 {
            let align = S::WRITE_ALIGN.min(TAIL);
            self.tail[self.tail_len..].fill(0xFF);
            slots.write_next(self.flushed, &self.tail[..align])?;
            self.flushed += align;
        }
        self.check.finish()?;
        // The size was checked against the slot's length at the start.
        let limit = usize::try_from(self.manifest.size).unwrap_or(usize::MAX);
        let read = |at: usize, buf: &mut [u8]| slots.read_next(at, buf);
        if let Err(refused) = check_app_image(&self.manifest, Some(CHIP_ID_ESP32C3), limit, read) {
            slots.erase_next(0)?;
            return Err(refused.into());
        }
        Ok(())
    }
}

/// Whether the first `len` bytes `read` gives are an app image (header, segments, checksum,
/// appended SHA-256) whose app descriptor names the manifest's version, hardware (as the
/// project name) and security counter (as `secure_version`), and, if `chip` is given, built
/// for that chip. What a device checks before it activates a slot, and the server before it
/// stores a release's image.
pub fn check_app_image(
    manifest: &FirmwareManifest,
    chip: Option<u16>,
    len: usize,
    read: impl FnMut(usize, &mut [u8]),
) -> Result<(), OtaRejection> {
    let info = app_image::verify(len, read).map_err(|_| OtaRejection::NotAnAppImage)?;
    let desc = info.app_desc().ok_or(OtaRejection::NotAnAppImage)?;
    if chip.is_some_and(|chip| chip != info.chip_id) {
        return Err(OtaRejection::NotAnAppImage);
    }
    if desc.version() != Some(manifest.version.as_str())
        || desc.project_name() != Some(manifest.hardware.as_str())
        || desc.secure_version() != manifest.security_counter
    {
        return Err(OtaRejection::DescriptorMismatch);
    }
    Ok(())
}

/// Erase blocks an image of the manifest's size covers (its size was checked against the
/// slot's before this is used).
fn image_blocks<S: OtaSlots>(manifest: &FirmwareManifest) -> usize {
    usize::try_from(manifest.size)
        .unwrap_or(usize::MAX)
        .div_ceil(S::ERASE_BLOCK)
}

fn is_blank<S: OtaSlots>(slots: &S, offset: usize, len: usize) -> bool {
    let mut buf = [0u8; 256];
    let mut at = 0;
    while at < len {
        let n = buf.len().min(len - at);
        slots.read_next(offset + at, &mut buf[..n]);
        if buf[..n].iter().any(|b| *b != 0xFF) {
            return false;
        }
        at += n;
    }
    true
}
