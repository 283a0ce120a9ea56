//! The otadata/slot decoder over arbitrary flash contents, then every transition the
//! bootloader and the app make on it through `OtaSlots`: none panics, and each does what the
//! slot rules say (the bootloader's step turns NEW into PENDING_VERIFY on the same slot,
//! confirm turns PENDING_VERIFY into VALID, roll back selects the other slot; every change
//! has a higher sequence number).
#![no_main]

use flotilla_device_core::otadata::{Layout, OtaData};
use flotilla_device_core::slots::{Flash, FlashError, ImageState, OtaSlots};
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

const LAYOUT: Layout = Layout {
    otadata: 0,
    slots: [2 * BLOCK, 3 * BLOCK],
    slot_len: BLOCK,
};

fuzz_target!(|data: &[u8]| {
    // Two otadata blocks from the input (the rest erased), then two small slots.
    let mut flash = Ram(vec![0xff; 4 * BLOCK]);
    let n = data.len().min(2 * BLOCK);
    flash.0[..n].copy_from_slice(&data[..n]);
    let mut ota = OtaData::new(LAYOUT, flash);

    let before = ota.selection();
    let original = ota.flash().0.clone();
    // What the bootloader does at power-on: a NEW image goes on probation.
    if ota.running_state() == Some(ImageState::New) {
        match ota.set_running_state(ImageState::PendingVerify) {
            Ok(()) => {}
            Err(FlashError::SequenceExhausted) => {
                assert_eq!(
                    ota.flash().0,
                    original,
                    "an exhausted sequence writes nothing"
                );
                return;
            }
            Err(e) => panic!("boot: {e:?}"),
        }
    }
    let booted = ota.running_slot();
    let after = ota.selection();
    match before {
        None => assert_eq!((booted, after), (0, None), "factory-fresh boots slot 0"),
        Some(b) => {
            assert_eq!(booted, b.slot, "boot follows the selection");
            let a = after.expect("a selection survives boot");
            assert_eq!(a.slot, b.slot);
            if b.state == ImageState::New {
                assert_eq!(a.state, ImageState::PendingVerify);
                assert!(a.seq > b.seq);
            } else {
                assert_eq!(a, b, "boot changes only a NEW selection");
            }
        }
    }

    if let Some(s) = after
        && s.state == ImageState::PendingVerify
    {
        if ota.confirm() == Err(FlashError::SequenceExhausted) {
            return;
        }
        let c = ota.selection().expect("selection after confirm");
        assert_eq!((c.slot, c.state), (s.slot, ImageState::Valid));
        assert!(c.seq > s.seq);
    }

    if let Some(s) = ota.selection() {
        if ota.roll_back() == Err(FlashError::SequenceExhausted) {
            return;
        }
        let r = ota.selection().expect("selection after roll back");
        assert_ne!(r.slot, s.slot, "roll back selects the other slot");
        assert!(r.seq > s.seq);
    }
});
