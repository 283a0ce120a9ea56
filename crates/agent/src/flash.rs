//! The virtual chip's SPI flash: one file laid out as the ESP32-C3's (an ESP-IDF partition
//! table at 0x8000, otadata at 0xd000, the app slots ota_0 and ota_1 from 0x10000), with NOR
//! semantics enforced (erase to 0xFF in 4 KiB blocks, aligned writes, no writes to bytes that
//! were not erased), so the agent exercises the same slot code the ESP32 runs. The agent keeps
//! its NVS in files beside it (`nvs.rs`), so the table's nvs partition stays erased here.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;
use flotilla_device_core::otadata::{Layout, OtaData};
use flotilla_device_core::slots::{Flash, FlashError, ImageState, OtaSlots};

use crate::partitions;

pub const FLASH_FILE: &str = "flash.bin";
const BLOCK: usize = 4096;

#[derive(Debug)]
pub struct FileFlash {
    file: File,
    len: usize,
}

/// Where otadata and the slots are in the partition table for slots of `slot_len` bytes
/// (rounded up to 64 KiB, as app partitions are).
pub fn layout(slot_len: usize) -> Layout {
    let table = partitions::table(slot_len);
    Layout {
        otadata: partitions::OTADATA_OFFSET,
        slots: [table[3].offset as usize, table[4].offset as usize],
        slot_len: table[3].size as usize,
    }
}

/// The flash file's slots, as the app and the bootloader work on them.
pub fn open_slots(path: &Path, layout: &Layout) -> anyhow::Result<OtaData<FileFlash>> {
    Ok(OtaData::new(*layout, FileFlash::open(path, layout)?))
}

impl FileFlash {
    /// Opens the flash file, creating a factory-blank chip the first time (its partition
    /// table written, otadata erased); a chip partitioned for another layout is refused. The
    /// slots start as a sparse file: a slot is erased when an image is written to it.
    pub fn open(path: &Path, layout: &Layout) -> anyhow::Result<FileFlash> {
        let len = layout.slots[1] + layout.slot_len;
        let table = partitions::encode(&partitions::table(layout.slot_len));
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
            let at = partitions::TABLE_OFFSET;
            flash
                .erase(at)
                .and_then(|()| flash.write(at, &table))
                .map_err(|e| anyhow::anyhow!("writing the partition table: {e:?}"))?;
            for i in 0..2 {
                flash
                    .erase(layout.otadata + i * BLOCK)
                    .map_err(|e| anyhow::anyhow!("erasing otadata: {e:?}"))?;
            }
            flash.file.sync_all()?;
        }
        let mut on_flash = vec![0u8; partitions::TABLE_LEN];
        flash.read(partitions::TABLE_OFFSET, &mut on_flash);
        if on_flash != table {
            let found = partitions::decode(&on_flash)
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|e| e);
            anyhow::bail!(
                "{} is not partitioned for {} KiB slots (found: {found}); \
                 give the --slot-size it was made with, or start from a new data directory",
                path.display(),
                layout.slot_len / 1024
            );
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

/// Slots whose flash I/O leaves the async worker it runs on (`block_in_place`, on a
/// multi-threaded runtime): a download stalled by a slow disk, or erasing an image's blocks,
/// holds up only itself, not the other devices' connections sharing that worker. On a
/// current-thread runtime (the paused-clock tests) the I/O runs in place.
pub struct BlockingIo<S>(pub S);

fn blocking<R>(io: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(io),
        _ => io(),
    }
}

impl<S: OtaSlots> OtaSlots for BlockingIo<S> {
    const ERASE_BLOCK: usize = S::ERASE_BLOCK;
    const WRITE_ALIGN: usize = S::WRITE_ALIGN;

    fn slot_len(&self) -> usize {
        self.0.slot_len()
    }
    fn running_slot(&self) -> usize {
        blocking(|| self.0.running_slot())
    }
    fn running_state(&self) -> Option<ImageState> {
        blocking(|| self.0.running_state())
    }
    fn set_running_state(&mut self, state: ImageState) -> Result<(), FlashError> {
        blocking(|| self.0.set_running_state(state))
    }
    fn read_next(&self, offset: usize, buf: &mut [u8]) {
        blocking(|| self.0.read_next(offset, buf))
    }
    fn erase_next(&mut self, offset: usize) -> Result<(), FlashError> {
        blocking(|| self.0.erase_next(offset))
    }
    fn write_next(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        blocking(|| self.0.write_next(offset, data))
    }
    fn activate_next(&mut self) -> Result<(), FlashError> {
        blocking(|| self.0.activate_next())
    }
    fn roll_back(&mut self) -> Result<(), FlashError> {
        blocking(|| self.0.roll_back())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A flash whose writes wait for a word from another task.
    struct Waiting(mpsc::Receiver<()>);

    impl OtaSlots for Waiting {
        const ERASE_BLOCK: usize = 4096;
        const WRITE_ALIGN: usize = 4;
        fn slot_len(&self) -> usize {
            4096
        }
        fn running_slot(&self) -> usize {
            0
        }
        fn running_state(&self) -> Option<ImageState> {
            None
        }
        fn set_running_state(&mut self, _: ImageState) -> Result<(), FlashError> {
            Ok(())
        }
        fn read_next(&self, _: usize, _: &mut [u8]) {}
        fn erase_next(&mut self, _: usize) -> Result<(), FlashError> {
            Ok(())
        }
        fn write_next(&mut self, _: usize, _: &[u8]) -> Result<(), FlashError> {
            self.0
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| FlashError::PowerLost)
        }
        fn activate_next(&mut self) -> Result<(), FlashError> {
            Ok(())
        }
        fn roll_back(&mut self) -> Result<(), FlashError> {
            Ok(())
        }
    }

    /// One worker thread, running a download's write that blocks until another task on that
    /// worker runs: had the write held the worker, it would time out; through `BlockingIo`
    /// the other task runs meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_slow_flash_write_leaves_the_worker_to_other_tasks() {
        let download = tokio::spawn(async {
            let (tx, rx) = mpsc::channel();
            // Queued on this worker, behind the task running now.
            let other = tokio::spawn(async move { tx.send(()).unwrap() });
            let written = BlockingIo(Waiting(rx)).write_next(0, &[0; 4]);
            other.await.unwrap();
            written
        });
        assert_eq!(download.await.unwrap(), Ok(()));
    }
}
