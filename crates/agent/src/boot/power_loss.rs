//! Power cuts at every flash operation of a device's update lifecycle (a first update, its
//! confirmation, an update that never confirms and is rolled back, a second update and its
//! confirmation), each cut before the operation and torn part-way through it: the device always
//! boots a complete image, the right one, and the lifecycle then completes. Also: a download
//! cut by power loss resumes; bad images never reach activation. The slot code is device-core's
//! (`SlotWriter`, `OtaData`), the bootloader this agent's.

use flotilla_device_core::install::{InstallError, SlotWriter};
use flotilla_device_core::ota::{OtaRejection, to_hex};
use flotilla_device_core::otadata::{Layout, OtaData};
use flotilla_device_core::slots::{Flash, FlashError, ImageState, MAX_UNCONFIRMED_BOOTS, OtaSlots};
use flotilla_proto::FirmwareManifest;
use sha2::{Digest, Sha256};

use super::bootloader;
use super::cut_flash::{CUT_BLOCK as BLOCK, CutFlash};

const POWER_LOST: InstallError = InstallError::Flash(FlashError::PowerLost);

const SLOT_LEN: usize = 4 * BLOCK;

fn layout() -> Layout {
    Layout {
        otadata: 0,
        slots: [2 * BLOCK, 2 * BLOCK + SLOT_LEN],
        slot_len: SLOT_LEN,
    }
}

/// Release `n` (version `n.0.0`), an app image that nearly fills a slot.
fn image(n: u8) -> Vec<u8> {
    image_of_size(n, SLOT_LEN - 100)
}

fn image_of_size(n: u8, size: usize) -> Vec<u8> {
    let header = crate::image::ImageHeader {
        version: format!("{n}.0.0"),
        hardware: "esp32c3".into(),
        security_counter: 3,
        behaviour: Default::default(),
    };
    crate::image::build(&header, size).unwrap()
}

/// A factory chip: image 1 in slot 0, no otadata.
fn factory() -> CutFlash {
    let mut f = CutFlash::new(2 * BLOCK + 2 * SLOT_LEN);
    let img = image(1);
    f.write(layout().slots[0], &img).unwrap();
    f.arm(None);
    f
}

/// The manifest of release `n`'s image (`image(n)`'s descriptor); for bytes that are no app
/// image, release 2's with their size and hash.
fn manifest_of(img: &[u8]) -> FirmwareManifest {
    let read = |at: usize, buf: &mut [u8]| buf.copy_from_slice(&img[at..at + buf.len()]);
    let version = flotilla_device_core::app_image::verify(img.len(), read)
        .ok()
        .and_then(|info| Some(info.app_desc()?.version()?.to_string()))
        .unwrap_or_else(|| "2.0.0".into());
    FirmwareManifest {
        version,
        hardware: "esp32c3".into(),
        size: img.len() as u64,
        sha256: to_hex(&Sha256::digest(img)),
        security_counter: 3,
        issued_at: 1_800_000_000,
        expires_at: Some(1_900_000_000),
    }
}

/// The slots of `f` as the app and the bootloader see them.
fn ota(f: &mut CutFlash) -> OtaData<&mut CutFlash> {
    OtaData::new(layout(), f)
}

fn slot_holds(f: &CutFlash, slot: usize, img: &[u8]) -> bool {
    let mut buf = vec![0u8; img.len()];
    f.read(layout().slots[slot], &mut buf);
    buf == img
}

/// The steps of the lifecycle under test, in order.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Stream image `n` into the inactive slot, check it, activate it, reboot into it.
    Update(u8),
    /// The running image passed its health check.
    Confirm,
    /// Install image `n`, which crashes at every boot until the bootloader rolls it back.
    Crashing(u8),
}

const LIFECYCLE: [Step; 5] = [
    Step::Update(2),
    Step::Confirm,
    Step::Crashing(3),
    Step::Update(4),
    Step::Confirm,
];

/// The chip: its flash, and what the app keeps in NVS (written whole or not at all).
struct Chip {
    flash: CutFlash,
    /// Boots since the last stable one (the app's crash counter).
    unstable_boots: u32,
    /// The image running now (the number `image` was made with).
    running: u8,
    /// Image `n`'s update was given up by the bootloader (reported ROLLED_BACK, not retried).
    rolled_back: Option<u8>,
    /// Image `n` was activated (its otadata entry written whole) in the step running now.
    activated: Option<u8>,
}

/// Which complete image `slot` holds, if any.
fn image_in(f: &CutFlash, slot: usize) -> Option<u8> {
    (1..=4).find(|n| slot_holds(f, slot, &image(*n)))
}

impl Chip {
    fn factory() -> Chip {
        Chip {
            flash: factory(),
            unstable_boots: 0,
            running: 1,
            rolled_back: None,
            activated: None,
        }
    }

    /// Power-on: the bootloader picks a slot (rolling back an image that never confirmed),
    /// which must hold a complete image; the app counts the boot.
    fn power_on(&mut self) -> Result<(), FlashError> {
        let boot = bootloader(
            &mut ota(&mut self.flash),
            self.unstable_boots,
            MAX_UNCONFIRMED_BOOTS,
        )?;
        let Some(running) = image_in(&self.flash, boot.slot) else {
            panic!("slot {} booted without a complete image", boot.slot);
        };
        if boot.rolled_back {
            self.rolled_back = Some(self.running);
            self.unstable_boots = 0;
        }
        self.running = running;
        self.unstable_boots += 1;
        Ok(())
    }

    /// Runs `step` from wherever an earlier, interrupted attempt left it.
    fn run(&mut self, step: Step) -> Result<(), InstallError> {
        match step {
            Step::Update(n) | Step::Crashing(n) => {
                if self.rolled_back == Some(n) {
                    return Ok(());
                }
                if self.running != n {
                    let img = image(n);
                    let mut slots = ota(&mut self.flash);
                    let mut w = SlotWriter::begin(&mut slots, &manifest_of(&img))?;
                    for chunk in img.chunks(1001) {
                        w.write(&mut slots, chunk)?;
                    }
                    w.finish(&mut slots)?;
                    slots.activate_next()?;
                    self.activated = Some(n);
                    self.power_on()?;
                    assert_eq!(self.running, n, "the activated image did not boot");
                }
                if let Step::Crashing(_) = step {
                    // It crashes at every boot until the bootloader gives it up.
                    while self.rolled_back != Some(n) {
                        assert!(self.unstable_boots <= MAX_UNCONFIRMED_BOOTS + 1);
                        self.power_on()?;
                    }
                }
            }
            Step::Confirm => {
                ota(&mut self.flash).confirm()?;
                self.unstable_boots = 0;
            }
        }
        Ok(())
    }

    /// The images that may run after a power cut in `step`, which began with `before`: an
    /// update activated before the cut must run (unless it is the crashing one, which the
    /// bootloader may already have given up), one not activated must not.
    fn allowed_after_a_cut(&self, step: Step, before: u8) -> Vec<u8> {
        match step {
            Step::Update(n) if self.activated == Some(n) => vec![n],
            Step::Update(_) => vec![before],
            Step::Crashing(n) if self.activated == Some(n) => vec![before, n],
            Step::Crashing(_) => vec![before],
            Step::Confirm => vec![before],
        }
    }
}

#[test]
fn every_power_cut_in_an_update_lifecycle_boots_the_right_complete_image_and_it_completes() {
    // The operations of an uninterrupted lifecycle, and the cuts worth trying in each.
    let mut clean = Chip::factory();
    for step in LIFECYCLE {
        clean.run(step).unwrap();
    }
    assert_eq!(clean.running, 4);
    let cuts = clean.flash.cuts();
    let ops = clean.flash.units.len();
    assert!(ops > 100, "{ops} operations");

    for cut in &cuts {
        let mut chip = Chip::factory();
        chip.flash.arm(Some(*cut));
        let mut step_index = 0;
        let (interrupted, before) = loop {
            let step = LIFECYCLE[step_index];
            let before = chip.running;
            chip.activated = None;
            match chip.run(step) {
                Ok(()) => step_index += 1,
                Err(e) => {
                    assert_eq!(e, POWER_LOST, "{cut:?} in {step:?}");
                    break (step, before);
                }
            }
            assert!(step_index < LIFECYCLE.len(), "{cut:?} never happened");
        };
        // The power comes back: the right complete image boots (checked by power_on) ...
        chip.flash.cut = None;
        chip.power_on().unwrap();
        assert!(
            chip.allowed_after_a_cut(interrupted, before)
                .contains(&chip.running),
            "{cut:?} in {interrupted:?}: image {} runs",
            chip.running
        );
        // ... and the interrupted step, then the rest, complete.
        for step in &LIFECYCLE[step_index..] {
            chip.run(*step)
                .unwrap_or_else(|e| panic!("{cut:?}: {step:?} after the cut: {e:?}"));
        }
        assert_eq!(chip.running, 4, "{cut:?}");
        assert_eq!(chip.rolled_back, Some(3), "{cut:?}");
        let state = ota(&mut chip.flash).running_state();
        assert_eq!(state, Some(ImageState::Valid), "{cut:?}");
    }
    println!(
        "power cut tested at {} interruption points ({ops} flash operations of a first update, \
         its confirmation, a rolled-back update and a second update, each cut before it and \
         torn part-way)",
        cuts.len()
    );
}

#[test]
fn an_image_that_never_confirms_is_rolled_back_to_the_previous_slot() {
    let mut chip = Chip::factory();
    chip.run(Step::Update(2)).unwrap();
    chip.run(Step::Confirm).unwrap(); // slot 1 valid
    let mut f = chip.flash;
    let mut slots = ota(&mut f);
    assert_eq!(slots.next_slot(), 0);
    let mut w = SlotWriter::begin(&mut slots, &manifest_of(&image(3))).unwrap();
    w.write(&mut slots, &image(3)).unwrap();
    w.finish(&mut slots).unwrap();
    slots.activate_next().unwrap();
    // Three boots without a confirmation (the app's crash counter counts them)...
    for unstable in 0..MAX_UNCONFIRMED_BOOTS {
        let boot = bootloader(&mut slots, unstable, MAX_UNCONFIRMED_BOOTS).unwrap();
        assert_eq!(
            (boot.slot, boot.pending_verify, boot.rolled_back),
            (0, true, false)
        );
        assert_eq!(slots.running_state(), Some(ImageState::PendingVerify));
    }
    // ...so the next power-on rolls back, and runs the previous image, still valid.
    let boot = bootloader(&mut slots, MAX_UNCONFIRMED_BOOTS, MAX_UNCONFIRMED_BOOTS).unwrap();
    assert_eq!(
        (boot.slot, boot.pending_verify, boot.rolled_back),
        (1, false, true)
    );
    assert_eq!(slots.running_state(), Some(ImageState::Valid));
    let again = bootloader(&mut slots, 0, MAX_UNCONFIRMED_BOOTS).unwrap();
    assert_eq!((again.slot, again.rolled_back), (1, false));
    assert!(slot_holds(&f, 1, &image(2)));
}

#[test]
fn a_download_cut_by_power_loss_resumes_from_the_persisted_offset() {
    let img = image(2);
    let m = manifest_of(&img);
    let chunks: Vec<&[u8]> = img.chunks(777).collect();
    // Operations of the writing phase only (erase first, then writes).
    let mut clean = factory();
    let mut slots = ota(&mut clean);
    let mut w = SlotWriter::begin(&mut slots, &m).unwrap();
    chunks.iter().for_each(|c| w.write(&mut slots, c).unwrap());
    w.finish(&mut slots).unwrap();
    let cuts = clean.cuts();
    let mut resumed_mid_image = 0;
    for cut in &cuts {
        let mut f = factory();
        f.arm(Some(*cut));
        // The offset the agent persists after each chunk: only bytes already flushed.
        let mut persisted: Option<u64> = None;
        let result = (|| {
            let mut slots = ota(&mut f);
            let mut w = SlotWriter::begin(&mut slots, &m)?;
            persisted = Some(0);
            for c in &chunks {
                w.write(&mut slots, c)?;
                persisted = Some(w.flushed());
            }
            w.finish(&mut slots)
        })();
        assert_eq!(result.unwrap_err(), POWER_LOST, "{cut:?}");
        f.cut = None;
        // Reboot: still the old image.
        let mut slots = ota(&mut f);
        assert_eq!(
            bootloader(&mut slots, 0, MAX_UNCONFIRMED_BOOTS)
                .unwrap()
                .slot,
            0
        );
        let (mut w, from) = match persisted {
            Some(offset) => SlotWriter::resume(&mut slots, &m, offset).unwrap(),
            None => (SlotWriter::begin(&mut slots, &m).unwrap(), 0),
        };
        if from > 0 {
            resumed_mid_image += 1;
        }
        for c in img[from as usize..].chunks(777) {
            w.write(&mut slots, c).unwrap();
        }
        w.finish(&mut slots).unwrap();
        slots.activate_next().unwrap();
        assert_eq!(
            bootloader(&mut slots, 0, MAX_UNCONFIRMED_BOOTS)
                .unwrap()
                .slot,
            1
        );
        assert!(slot_holds(&f, 0, &image(1)));
        assert!(slot_holds(&f, 1, &img), "{cut:?}");
    }
    assert!(resumed_mid_image > 0);
    println!(
        "download resumed after {} power cuts, before and part-way through each operation \
         ({resumed_mid_image} mid-image)",
        cuts.len()
    );
}

#[test]
fn bad_images_never_reach_activation_and_leave_the_running_slot_untouched() {
    let img = image(2);
    let m = manifest_of(&img);
    let mut flipped = img.clone();
    flipped[1234] ^= 0x01;
    let mut longer = img.clone();
    longer.push(0);
    let other = image(7);
    let cases: [(&str, &[u8], &FirmwareManifest, OtaRejection); 4] = [
        ("bit flip", &flipped, &m, OtaRejection::HashMismatch),
        (
            "truncated",
            &img[..img.len() - 1],
            &m,
            OtaRejection::Truncated,
        ),
        ("longer than declared", &longer, &m, OtaRejection::TooLarge),
        (
            "another release's image",
            &other,
            &m,
            OtaRejection::HashMismatch,
        ),
    ];
    for (name, bytes, manifest, reason) in cases {
        let mut f = factory();
        let before = f.mem.clone();
        let result = (|| {
            let mut slots = ota(&mut f);
            let mut w = SlotWriter::begin(&mut slots, manifest)?;
            for c in bytes.chunks(1000) {
                w.write(&mut slots, c)?;
            }
            w.finish(&mut slots)
        })();
        assert_eq!(
            result.unwrap_err(),
            InstallError::Rejected(reason),
            "{name}"
        );
        assert_eq!(ota(&mut f).selection(), None, "{name}: otadata changed");
        assert_eq!(
            f.mem[..2 * BLOCK + SLOT_LEN],
            before[..2 * BLOCK + SLOT_LEN],
            "{name}"
        );
        let boot = bootloader(&mut ota(&mut f), 0, MAX_UNCONFIRMED_BOOTS).unwrap();
        assert_eq!(boot.slot, 0);
    }
    // Larger than the slot: refused before the slot is even erased.
    let mut f = factory();
    let mut huge = m.clone();
    huge.size = SLOT_LEN as u64 + 1;
    let before = f.mem.clone();
    assert!(SlotWriter::begin(&mut ota(&mut f), &huge).is_err());
    assert_eq!(f.mem, before);
}

#[test]
fn a_fresh_install_erases_only_the_blocks_its_image_covers() {
    let mut f = factory();
    // Whatever an earlier, larger image left in the slot's last block.
    let last_block = layout().slots[1] + SLOT_LEN - BLOCK;
    f.write(last_block, &[0x5A; 16]).unwrap();
    let img = image_of_size(2, BLOCK + BLOCK / 2);
    let mut slots = ota(&mut f);
    let mut w = SlotWriter::begin(&mut slots, &manifest_of(&img)).unwrap();
    w.write(&mut slots, &img).unwrap();
    w.finish(&mut slots).unwrap();
    assert!(slot_holds(&f, 1, &img));
    // The image's two blocks were erased and written; the rest of the slot was not touched.
    assert_eq!(f.mem[last_block..last_block + 16], [0x5A; 16]);
    assert!(
        f.mem[layout().slots[1] + img.len()..layout().slots[1] + 2 * BLOCK]
            .iter()
            .all(|b| *b == 0xFF)
    );
}
