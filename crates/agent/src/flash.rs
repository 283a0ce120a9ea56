//! The virtual chip's SPI flash: one file holding otadata and the two app slots, with NOR
//! semantics enforced (erase to 0xFF in 4 KiB blocks, aligned writes, no writes to bytes that
//! were not erased), so the agent exercises the same slot code the ESP32 runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;
use flotilla_device_core::slots::{Flash, FlashError, Layout};

pub const FLASH_FILE: &str = "flash.bin";
const BLOCK: usize = 4096;

#[derive(Debug)]
pub struct FileFlash {
    file: File,
    len: usize,
}

/// Otadata at 0 (two blocks), then ota_0 and ota_1 of `slot_len` each.
pub fn layout(slot_len: usize) -> Layout {
    let slot_len = slot_len.div_ceil(BLOCK) * BLOCK;
    Layout {
        otadata: 0,
        slots: [2 * BLOCK, 2 * BLOCK + slot_len],
        slot_len,
    }
}

impl FileFlash {
    /// Opens the flash file, creating a factory-blank chip (otadata erased) the first time.
    /// The slots start as a sparse file: a slot is erased when an image is written to it.
    pub fn open(path: &Path, layout: &Layout) -> anyhow::Result<FileFlash> {
        let len = layout.slots[1] + layout.slot_len;
        let fresh = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening flash {}", path.display()))?;
        if file.metadata()?.len() < len as u64 {
            file.set_len(len as u64)?;
        }
        let mut flash = FileFlash { file, len };
        if fresh {
            for i in 0..2 {
                flash
                    .erase(layout.otadata + i * BLOCK)
                    .map_err(|e| anyhow::anyhow!("erasing otadata: {e:?}"))?;
            }
            flash.file.sync_all()?;
        }
        Ok(flash)
    }

    /// Durability point: the chip's writes are durable when they return; a file's are not.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Another handle on the same file, to sync from elsewhere.
    pub fn sync_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }
}

impl Flash for FileFlash {
    const ERASE_BLOCK: usize = BLOCK;
    const WRITE_ALIGN: usize = 4;

    fn read(&self, offset: usize, buf: &mut [u8]) {
        // A read error looks like garbage, which every reader above already refuses.
        if self.file.read_exact_at(buf, offset as u64).is_err() {
            buf.fill(0);
        }
    }

    fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
        if !offset.is_multiple_of(BLOCK) || offset + BLOCK > self.len {
            return Err(FlashError::Misaligned);
        }
        self.file
            .write_all_at(&[0xFF; BLOCK], offset as u64)
            .map_err(|_| FlashError::PowerLost)
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        if !offset.is_multiple_of(4)
            || !data.len().is_multiple_of(4)
            || offset + data.len() > self.len
        {
            return Err(FlashError::Misaligned);
        }
        let mut current = vec![0u8; data.len()];
        self.read(offset, &mut current);
        if current.iter().any(|b| *b != 0xFF) {
            return Err(FlashError::NotErased);
        }
        self.file
            .write_all_at(data, offset as u64)
            .map_err(|_| FlashError::PowerLost)
    }
}
