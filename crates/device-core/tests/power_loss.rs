//! Power cuts at every flash operation of an A/B update: the device always boots a complete
//! image, and a second update then succeeds. Also: an image that never confirms rolls back.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_device_core::slots::{Flash, FlashError, ImageState, Layout};

const BLOCK: usize = 4096;
const SLOT_LEN: usize = 4 * BLOCK;

/// NOR flash with erase blocks, write alignment, no writes to unerased bytes, and a power cut
/// before operation number `cut_at` (a torn erase or write leaves half of it done).
#[derive(Clone)]
struct SimFlash {
    mem: Vec<u8>,
    ops: usize,
    cut_at: Option<usize>,
}

impl SimFlash {
    fn new(len: usize) -> Self {
        SimFlash {
            mem: vec![0xFF; len],
            ops: 0,
            cut_at: None,
        }
    }

    fn tick(&mut self) -> bool {
        let cut = self.cut_at == Some(self.ops);
        self.ops += 1;
        cut
    }
}

impl Flash for SimFlash {
    const ERASE_BLOCK: usize = BLOCK;
    const WRITE_ALIGN: usize = 4;

    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.mem[offset..offset + buf.len()]);
    }

    fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
        if !offset.is_multiple_of(BLOCK) || offset + BLOCK > self.mem.len() {
            return Err(FlashError::Misaligned);
        }
        if self.tick() {
            self.mem[offset..offset + BLOCK / 2].fill(0xFF); // torn erase
            return Err(FlashError::PowerLost);
        }
        self.mem[offset..offset + BLOCK].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        if !offset.is_multiple_of(4)
            || !data.len().is_multiple_of(4)
            || offset + data.len() > self.mem.len()
        {
            return Err(FlashError::Misaligned);
        }
        if self.mem[offset..offset + data.len()]
            .iter()
            .any(|b| *b != 0xFF)
        {
            return Err(FlashError::NotErased);
        }
        let n = if self.tick() {
            data.len() / 2 / 4 * 4
        } else {
            data.len()
        };
        self.mem[offset..offset + n].copy_from_slice(&data[..n]);
        if n < data.len() {
            Err(FlashError::PowerLost)
        } else {
            Ok(())
        }
    }
}

fn layout() -> Layout {
    Layout {
        otadata: 0,
        slots: [2 * BLOCK, 2 * BLOCK + SLOT_LEN],
        slot_len: SLOT_LEN,
    }
}

fn image(version: u8) -> Vec<u8> {
    (0..SLOT_LEN - 100)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(version))
        .collect()
}

/// A factory chip: image 1 in slot 0, no otadata.
fn factory() -> SimFlash {
    let mut f = SimFlash::new(2 * BLOCK + 2 * SLOT_LEN);
    let img = image(1);
    f.write(layout().slots[0], &img).unwrap();
    f.ops = 0;
    f
}

/// The whole update, as the device runs it: erase the inactive slot, write the image in
/// aligned chunks, activate, reboot, confirm after the health check.
fn update(f: &mut SimFlash, img: &[u8]) -> Result<usize, FlashError> {
    let l = layout();
    let slot = l.inactive_slot(f);
    l.erase_slot(f, slot)?;
    for (i, chunk) in img.chunks(1024).enumerate() {
        let mut c = chunk.to_vec();
        c.resize(chunk.len().div_ceil(4) * 4, 0xFF);
        f.write(l.slots[slot] + i * 1024, &c)?;
    }
    l.activate(f, slot)?;
    let booted = l.boot(f)?;
    assert_eq!(booted, slot);
    l.confirm(f)?;
    Ok(slot)
}

fn slot_holds(f: &SimFlash, slot: usize, img: &[u8]) -> bool {
    let mut buf = vec![0u8; img.len()];
    f.read(layout().slots[slot], &mut buf);
    buf == img
}

#[test]
fn every_power_cut_during_an_update_leaves_a_bootable_complete_image() {
    // Count the operations of an uninterrupted update.
    let mut clean = factory();
    update(&mut clean, &image(2)).unwrap();
    let total = clean.ops;
    assert!(total > 10);
    let mut tested = 0;
    for cut in 0..total {
        let mut f = factory();
        f.cut_at = Some(cut);
        assert_eq!(
            update(&mut f, &image(2)),
            Err(FlashError::PowerLost),
            "cut before op {cut}"
        );
        // Power returns; the bootloader picks a slot.
        f.cut_at = None;
        let l = layout();
        let booted = l.boot(&mut f).unwrap();
        let expected = if booted == 0 { image(1) } else { image(2) };
        assert!(
            slot_holds(&f, booted, &expected),
            "cut before op {cut}: booted slot {booted} holds a broken image"
        );
        l.confirm(&mut f).unwrap();
        // A second update after the interruption succeeds and boots.
        let slot = update(&mut f, &image(3)).unwrap();
        assert!(slot_holds(&f, slot, &image(3)));
        assert_eq!(l.selection(&f).unwrap().state, ImageState::Valid);
        tested += 1;
    }
    assert_eq!(tested, total);
    println!("power cut tested before each of {tested} flash operations");
}

#[test]
fn an_image_that_never_confirms_is_rolled_back_to_the_previous_slot() {
    let l = layout();
    let mut f = factory();
    update(&mut f, &image(2)).unwrap(); // slot 1 valid
    let slot = l.inactive_slot(&f);
    assert_eq!(slot, 0);
    l.erase_slot(&mut f, slot).unwrap();
    f.write(l.slots[slot], &image(3)).unwrap();
    l.activate(&mut f, slot).unwrap();
    // Three boots without a confirmation (the app's crash counter reaches 3)...
    for _ in 0..3 {
        assert_eq!(l.boot(&mut f).unwrap(), 0);
        assert_eq!(l.selection(&f).unwrap().state, ImageState::PendingVerify);
    }
    // ...so the app rolls back, and the next boot runs the previous image, still valid.
    l.roll_back(&mut f).unwrap();
    assert_eq!(l.boot(&mut f).unwrap(), 1);
    assert!(slot_holds(&f, 1, &image(2)));
    assert_eq!(l.selection(&f).unwrap().state, ImageState::Valid);
}
