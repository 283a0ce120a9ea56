//! ESP-IDF's otadata over any NOR-like [`Flash`]: the agent's implementation of [`OtaSlots`].
//!
//! Layout: two image slots (`ota_0`, `ota_1`) and an otadata partition of two erase blocks,
//! each holding one select entry in ESP-IDF's own format (`esp_ota_select_entry_t`, 32 bytes:
//! `ota_seq`, a 20-byte label left erased, `ota_state`, and a CRC-32 of `ota_seq` alone, as
//! ESP-IDF's `bootloader_common_ota_select_crc` computes it). An entry is valid, as in
//! `bootloader_common_ota_select_valid`, when its CRC matches and its state is neither INVALID
//! nor ABORTED. The valid entry with the highest sequence number wins (on a tie the first
//! block, as `bootloader_common_select_otadata` decides) and selects slot `(seq - 1) % 2`.
//!
//! Every change (switch slot, or change state) erases the block *not* holding the winning entry
//! and writes a strictly higher sequence number there (+2 keeps the slot, an odd step switches
//! it), so a power cut at any point leaves the old entry or the new one valid — never neither.
//! ESP-IDF itself rewrites the active block in place to change a state (`esp_ota_mark_app_valid_
//! cancel_rollback`), which a cut between its erase and its write turns into a switch back to
//! the older entry's slot; these entries read the same to ESP-IDF's bootloader, only the order
//! of writes differs. Image states follow ESP-IDF: NEW -> PENDING_VERIFY -> VALID; a
//! rolled-back image is superseded by a newer entry selecting the previous slot.

use crate::slots::{Flash, FlashError, ImageState, OtaSlots};

/// Where things live on the flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Start of the two otadata blocks (each `ERASE_BLOCK` long).
    pub otadata: usize,
    /// Start of each image slot.
    pub slots: [usize; 2],
    /// Length of each image slot, a multiple of `ERASE_BLOCK`.
    pub slot_len: usize,
}

/// The selected slot and its state, as read from otadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub slot: usize,
    pub seq: u32,
    pub state: ImageState,
}

/// `sizeof(esp_ota_select_entry_t)`.
pub const ENTRY_LEN: usize = 32;
const STATE_AT: usize = 24;
const CRC_AT: usize = 28;

/// The ROM's `crc32_le(crc, buf, len)` (reflected CRC-32, polynomial 0xEDB88320), which
/// inverts `crc` on the way in and out: `crc32_le(0, ..)` is zlib's CRC-32, and otadata uses
/// `crc32_le(UINT32_MAX, ..)` (Python: `binascii.crc32(data, 0xFFFFFFFF)`).
pub fn crc32_le(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// ESP-IDF's `bootloader_common_ota_select_crc`: the CRC covers the sequence number only.
pub fn entry_crc(seq: u32) -> u32 {
    crc32_le(u32::MAX, &seq.to_le_bytes())
}

/// An `esp_ota_select_entry_t` as ESP-IDF writes it; the label stays erased (0xFF).
pub fn encode_entry(seq: u32, state: ImageState) -> [u8; ENTRY_LEN] {
    let mut e = [0xFFu8; ENTRY_LEN];
    e[0..4].copy_from_slice(&seq.to_le_bytes());
    e[STATE_AT..STATE_AT + 4].copy_from_slice(&state.code().to_le_bytes());
    e[CRC_AT..CRC_AT + 4].copy_from_slice(&entry_crc(seq).to_le_bytes());
    e
}

/// From here on an otadata sequence number is neither read as valid nor written.
const MAX_SEQ: u32 = u32::MAX - 2;

/// A valid entry's sequence number and state. ESP-IDF's test is `ota_seq != UINT32_MAX`, a
/// state other than INVALID and ABORTED, and the CRC; this one also refuses 0 (which ESP-IDF
/// never writes: it would select slot `(0 - 1) % 2` by wrapping) and the top of the range,
/// where transitions would overflow.
pub fn decode_entry(e: &[u8; ENTRY_LEN]) -> Option<(u32, ImageState)> {
    let word = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
    let (seq, state, crc) = (word(0), word(STATE_AT), word(CRC_AT));
    // Transitions write seq + 1 or seq + 2, which `select` refuses from MAX_SEQ on, so no
    // valid entry makes them overflow.
    let state = ImageState::from_code(state);
    let given_up = matches!(state, ImageState::Invalid | ImageState::Aborted);
    (seq != 0 && seq < MAX_SEQ && !given_up && entry_crc(seq) == crc).then_some((seq, state))
}

/// otadata and the two slots on one flash.
#[derive(Debug)]
pub struct OtaData<F> {
    layout: Layout,
    flash: F,
}

impl<F: Flash> OtaData<F> {
    pub fn new(layout: Layout, flash: F) -> OtaData<F> {
        OtaData { layout, flash }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn flash(&self) -> &F {
        &self.flash
    }

    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    pub fn into_flash(self) -> F {
        self.flash
    }

    fn block(&self, i: usize) -> usize {
        self.layout.otadata + i * F::ERASE_BLOCK
    }

    /// Both otadata entries that are valid: `(block index, seq, state)`.
    fn entries(&self) -> [Option<(usize, u32, ImageState)>; 2] {
        let read = |i: usize| {
            let mut e = [0u8; ENTRY_LEN];
            self.flash.read(self.block(i), &mut e);
            decode_entry(&e).map(|(seq, st)| (i, seq, st))
        };
        [read(0), read(1)]
    }

    /// Whether both otadata entries are erased: a chip never updated (an entry that is there
    /// but not valid, or given up, is not this).
    pub fn is_blank(&self) -> bool {
        (0..2).all(|i| {
            let mut e = [0u8; ENTRY_LEN];
            self.flash.read(self.block(i), &mut e);
            e == [0xFF; ENTRY_LEN]
        })
    }

    /// The entry the bootloader would follow; `None` when no entry is valid (a chip never
    /// updated, or both given up): ESP-IDF then boots `ota_0`.
    pub fn selection(&self) -> Option<Selection> {
        let [a, b] = self.entries();
        let best = match (a, b) {
            // ESP-IDF: the first block unless the second's number is strictly higher.
            (Some(x), Some(y)) => Some(if x.1 >= y.1 { x } else { y }),
            (x, y) => x.or(y),
        }?;
        Some(Selection {
            slot: ((best.1 - 1) % 2) as usize,
            seq: best.1,
            state: best.2,
        })
    }

    /// The slot a new image goes to: the one not running.
    pub fn next_slot(&self) -> usize {
        1 - self.running_slot()
    }

    /// Writes a new selection into the block that does not hold the current one.
    fn select(&mut self, seq: u32, state: ImageState) -> Result<(), FlashError> {
        if seq >= MAX_SEQ {
            return Err(FlashError::SequenceExhausted);
        }
        let [a, b] = self.entries();
        let current_block = match (a, b) {
            (Some(x), Some(y)) => Some(if x.1 >= y.1 { 0 } else { 1 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        };
        let target = match current_block {
            Some(i) => 1 - i,
            None => 0,
        };
        let offset = self.block(target);
        self.flash.erase(offset)?;
        // 32 bytes suit any write alignment the chips have (4 on the ESP32-C3); the CRC word
        // is last, so a write cut part-way leaves an entry that does not verify.
        self.flash.write(offset, &encode_entry(seq, state))
    }

    /// Where `offset` of the next slot is on the flash, if `len` bytes from it stay inside.
    fn in_next(&self, offset: usize, len: usize) -> Result<usize, FlashError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.layout.slot_len)
        {
            return Err(FlashError::Misaligned);
        }
        Ok(self.layout.slots[self.next_slot()] + offset)
    }
}

impl<F: Flash> OtaSlots for OtaData<F> {
    const ERASE_BLOCK: usize = F::ERASE_BLOCK;
    const WRITE_ALIGN: usize = F::WRITE_ALIGN;

    fn slot_len(&self) -> usize {
        self.layout.slot_len
    }

    fn running_slot(&self) -> usize {
        self.selection().map_or(0, |s| s.slot)
    }

    fn running_state(&self) -> Option<ImageState> {
        self.selection().map(|s| s.state)
    }

    fn set_running_state(&mut self, state: ImageState) -> Result<(), FlashError> {
        let seq = self.selection().map_or(0, |s| s.seq);
        // +2 keeps the slot; on a chip never updated, 1 selects slot 0.
        self.select(if seq == 0 { 1 } else { seq + 2 }, state)
    }

    fn read_next(&self, offset: usize, buf: &mut [u8]) {
        match self.in_next(offset, buf.len()) {
            Ok(at) => self.flash.read(at, buf),
            // Outside the slot reads as erased, never as another partition's bytes.
            Err(_) => buf.fill(0xFF),
        }
    }

    fn erase_next(&mut self, offset: usize) -> Result<(), FlashError> {
        let at = self.in_next(offset, F::ERASE_BLOCK)?;
        self.flash.erase(at)
    }

    fn write_next(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        let at = self.in_next(offset, data.len())?;
        self.flash.write(at, data)
    }

    fn activate_next(&mut self) -> Result<(), FlashError> {
        let slot = self.next_slot();
        let seq = self.selection().map_or(0, |s| s.seq);
        // The next sequence number that selects `slot`.
        let mut next = seq + 1;
        if ((next - 1) % 2) as usize != slot {
            next += 1;
        }
        self.select(next, ImageState::New)
    }

    fn roll_back(&mut self) -> Result<(), FlashError> {
        let Some(s) = self.selection() else {
            return Ok(());
        };
        // A higher sequence number selecting the other slot, already VALID: it ran before.
        self.select(s.seq + 1, ImageState::Valid)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::slots::Flash;

    /// CRCs as ESP-IDF's otatool.py computes them: `binascii.crc32(struct.pack('I', seq),
    /// 0xFFFFFFFF)`.
    #[test]
    fn entries_carry_esp_idfs_crc_of_the_sequence_number() {
        for (seq, crc) in [
            (1, 0x4743_989A),
            (2, 0x55F6_3774),
            (3, 0xED4A_5011),
            (0x1234_5678, 0x71D6_A731),
        ] {
            assert_eq!(entry_crc(seq), crc, "seq {seq}");
        }
        let e = encode_entry(1, ImageState::New);
        assert_eq!(&e[0..4], &[1, 0, 0, 0]);
        assert_eq!(&e[4..24], &[0xFF; 20], "seq_label left erased");
        assert_eq!(&e[24..28], &[0, 0, 0, 0], "ESP_OTA_IMG_NEW");
        assert_eq!(&e[28..32], &[0x9A, 0x98, 0x43, 0x47]);
        assert_eq!(decode_entry(&e), Some((1, ImageState::New)));
        // The CRC covers the number only, as in ESP-IDF: a state change keeps it.
        let valid = encode_entry(1, ImageState::Valid);
        assert_eq!(&valid[28..32], &e[28..32]);
        // An erased entry, a zero sequence and a wrong CRC are not entries.
        assert_eq!(decode_entry(&[0xFF; ENTRY_LEN]), None);
        let mut zero = encode_entry(0, ImageState::Valid);
        assert_eq!(decode_entry(&zero), None);
        zero = e;
        zero[0] = 3;
        assert_eq!(decode_entry(&zero), None);
    }

    fn ram() -> Ram {
        Ram([0xFF; 2 * 4096])
    }

    struct Ram([u8; 2 * 4096]);
    impl Flash for Ram {
        const ERASE_BLOCK: usize = 4096;
        const WRITE_ALIGN: usize = 4;
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0[offset..offset + buf.len()]);
        }
        fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
            self.0[offset..offset + 4096].fill(0xFF);
            Ok(())
        }
        fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
            self.0[offset..offset + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    const LAYOUT: Layout = Layout {
        otadata: 0,
        slots: [8192, 12288],
        slot_len: 4096,
    };

    /// Two valid entries with one number: ESP-IDF's `bootloader_common_select_otadata` takes
    /// the first block's (`MAX(seq0, seq1) == seq0`).
    #[test]
    fn a_tie_goes_to_the_first_block_as_in_esp_idf() {
        let mut f = ram();
        f.write(0, &encode_entry(5, ImageState::Valid)).unwrap();
        f.write(4096, &encode_entry(5, ImageState::New)).unwrap();
        let mut ota = OtaData::new(LAYOUT, &mut f);
        assert_eq!(ota.running_state(), Some(ImageState::Valid));
        assert_eq!(ota.running_slot(), 0, "seq 5 selects slot 0");
        // The next change goes to the block not read: the second (seq 6 selects slot 1).
        ota.activate_next().unwrap();
        assert_eq!(ota.selection().unwrap().slot, 1);
        assert_eq!(
            decode_entry(&f.0[4096..4096 + 32].try_into().unwrap()),
            Some((6, ImageState::New))
        );
    }

    /// An entry marked INVALID or ABORTED is not followed, whatever its number: ESP-IDF's
    /// `bootloader_common_ota_select_valid` is false for it, so the other entry's slot boots.
    #[test]
    fn an_entry_given_up_on_is_not_followed() {
        for given_up in [ImageState::Invalid, ImageState::Aborted] {
            let mut f = ram();
            f.write(0, &encode_entry(1, ImageState::Valid)).unwrap();
            f.write(4096, &encode_entry(2, given_up)).unwrap();
            let ota = OtaData::new(LAYOUT, &mut f);
            assert_eq!(
                ota.selection(),
                Some(Selection {
                    slot: 0,
                    seq: 1,
                    state: ImageState::Valid
                }),
                "{given_up:?}"
            );
            assert_eq!(decode_entry(&encode_entry(2, given_up)), None);
        }
    }
}
