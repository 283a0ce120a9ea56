//! Power cuts at every flash operation of an A/B update: the device always boots a complete
//! image, and a second update then succeeds. Also: an image that never confirms rolls back.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_device_core::install::{InstallError, SlotWriter};
use flotilla_device_core::slots::{Flash, FlashError, ImageState, Layout};
use flotilla_proto::FirmwareManifest;

mod common;

const POWER_LOST: InstallError = InstallError::Flash(FlashError::PowerLost);

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

fn manifest_of(img: &[u8]) -> FirmwareManifest {
    common::manifest("2.0.0", img)
}

/// The whole update, as the device runs it: stream the image into the erased inactive slot
/// in odd-sized chunks (as the network delivers them), check size and hash, activate, reboot,
/// confirm after the health check.
fn update(f: &mut SimFlash, img: &[u8]) -> Result<usize, InstallError> {
    let l = layout();
    let slot = l.inactive_slot(f);
    let mut w = SlotWriter::begin(&l, f, slot, &manifest_of(img))?;
    for chunk in img.chunks(1001) {
        w.write(f, chunk)?;
    }
    w.finish(f)?;
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
            update(&mut f, &image(2)).unwrap_err(),
            POWER_LOST,
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

#[test]
fn a_download_cut_by_power_loss_resumes_from_the_persisted_offset() {
    let l = layout();
    let img = image(2);
    let m = manifest_of(&img);
    let chunks: Vec<&[u8]> = img.chunks(777).collect();
    // Operations of the writing phase only (erase first, then writes).
    let mut clean = factory();
    let mut w = SlotWriter::begin(&l, &mut clean, 1, &m).unwrap();
    chunks.iter().for_each(|c| w.write(&mut clean, c).unwrap());
    w.finish(&mut clean).unwrap();
    let total = clean.ops;
    let mut resumed_mid_image = 0;
    for cut in 0..total {
        let mut f = factory();
        f.cut_at = Some(cut);
        // The offset the agent persists after each chunk: only bytes already flushed.
        let mut persisted: Option<u64> = None;
        let result = (|| {
            let mut w = SlotWriter::begin(&l, &mut f, 1, &m)?;
            persisted = Some(0);
            for c in &chunks {
                w.write(&mut f, c)?;
                persisted = Some(w.flushed());
            }
            w.finish(&mut f)
        })();
        assert_eq!(result.unwrap_err(), POWER_LOST, "cut before op {cut}");
        f.cut_at = None;
        // Reboot: still the old image.
        assert_eq!(l.boot(&mut f).unwrap(), 0);
        assert!(slot_holds(&f, 0, &image(1)));
        let (mut w, from) = match persisted {
            Some(offset) => SlotWriter::resume(&l, &mut f, 1, &m, offset).unwrap(),
            None => (SlotWriter::begin(&l, &mut f, 1, &m).unwrap(), 0),
        };
        if from > 0 {
            resumed_mid_image += 1;
        }
        for c in img[from as usize..].chunks(777) {
            w.write(&mut f, c).unwrap();
        }
        w.finish(&mut f).unwrap();
        l.activate(&mut f, 1).unwrap();
        assert_eq!(l.boot(&mut f).unwrap(), 1);
        assert!(slot_holds(&f, 1, &img), "cut before op {cut}");
    }
    assert!(resumed_mid_image > 0);
    println!(
        "download resumed after a power cut before each of {total} operations ({resumed_mid_image} mid-image)"
    );
}

#[test]
fn bad_images_never_reach_activation_and_leave_the_running_slot_untouched() {
    let l = layout();
    let img = image(2);
    let m = manifest_of(&img);
    let mut flipped = img.clone();
    flipped[1234] ^= 0x01;
    let mut longer = img.clone();
    longer.push(0);
    let other = image(7);
    let cases: [(&str, &[u8], &FirmwareManifest); 4] = [
        ("bit flip", &flipped, &m),
        ("truncated", &img[..img.len() - 1], &m),
        ("longer than declared", &longer, &m),
        ("another release's image", &other, &m),
    ];
    for (name, bytes, manifest) in cases {
        let mut f = factory();
        let before = f.mem.clone();
        let result = (|| {
            let mut w = SlotWriter::begin(&l, &mut f, 1, manifest)?;
            for c in bytes.chunks(1000) {
                w.write(&mut f, c)?;
            }
            w.finish(&mut f)
        })();
        assert!(matches!(result, Err(InstallError::Rejected(_))), "{name}");
        assert_eq!(l.selection(&f), None, "{name}: otadata changed");
        assert_eq!(
            f.mem[..2 * BLOCK + SLOT_LEN],
            before[..2 * BLOCK + SLOT_LEN],
            "{name}"
        );
        assert_eq!(l.boot(&mut f).unwrap(), 0);
    }
    // Larger than the slot: refused before the slot is even erased.
    let mut f = factory();
    let mut huge = m.clone();
    huge.size = SLOT_LEN as u64 + 1;
    let before = f.mem.clone();
    assert!(SlotWriter::begin(&l, &mut f, 1, &huge).is_err());
    assert_eq!(f.mem, before);
}
