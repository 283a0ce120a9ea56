//! The otadata/slot decoder over arbitrary flash contents: the bootloader's choice is always
//! one of the two slots, and booting never panics.
#![no_main]

use flotilla_device_core::slots::{Flash, FlashError, Layout};
use libfuzzer_sys::fuzz_target;

const BLOCK: usize = 4096;

struct Ram(Vec<u8>);

impl Flash for Ram {
    const ERASE_BLOCK: usize = BLOCK;
    const WRITE_ALIGN: usize = 4;

    fn read(&self, offset: usize, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.0.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
        if offset % BLOCK != 0 || offset + BLOCK > self.0.len() {
            return Err(FlashError::Misaligned);
        }
        self.0[offset..offset + BLOCK].fill(0xff);
        Ok(())
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        if offset % 4 != 0 || offset + data.len() > self.0.len() {
            return Err(FlashError::Misaligned);
        }
        for (i, b) in data.iter().enumerate() {
            self.0[offset + i] &= *b;
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // Two otadata blocks from the input (the rest erased), then two small slots.
    let mut flash = Ram(vec![0xff; 4 * BLOCK]);
    let n = data.len().min(2 * BLOCK);
    flash.0[..n].copy_from_slice(&data[..n]);
    let layout = Layout {
        otadata: 0,
        slots: [2 * BLOCK, 3 * BLOCK],
        slot_len: BLOCK,
    };
    if let Some(sel) = layout.selection(&flash) {
        assert!(sel.slot < 2, "selected slot {}", sel.slot);
    }
    if let Ok(slot) = layout.boot(&mut flash) {
        assert!(slot < 2);
    }
    let _ = layout.inactive_slot(&flash);
});
