//! The A/B firmware slots as an update sees them: the seam between the OTA code and each
//! platform's slot implementation.
//!
//! [`OtaSlots`] is what [`crate::install`] writes an image through and what the shell
//! activates, confirms and rolls back with. On the ESP32-C3 it is implemented over
//! esp-bootloader-esp-idf's `OtaUpdater` (`next_partition`, `activate_next_partition`,
//! `current_ota_state`, `set_current_ota_state`); on the Linux agent by
//! [`crate::otadata::OtaData`], ESP-IDF's otadata format over any [`Flash`]. The bootloader
//! itself (what runs at power-on) is the chip's ROM and second stage, and in the agent the
//! agent's own simulation; it is not here.

/// NOR flash as the chip has it: erase sets a block to 0xFF; a write may only clear bits of
/// erased bytes, at aligned offsets.
pub trait Flash {
    const ERASE_BLOCK: usize;
    const WRITE_ALIGN: usize;
    fn read(&self, offset: usize, buf: &mut [u8]);
    fn erase(&mut self, offset: usize) -> Result<(), FlashError>;
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashError {
    /// Offset or length not aligned, or outside the device.
    Misaligned,
    /// A write to bytes that were not erased.
    NotErased,
    /// The power went out (simulations only).
    PowerLost,
    /// otadata's sequence numbers are used up (after some 4 billion changes, or garbage in
    /// otadata): nothing was written.
    SequenceExhausted,
}

/// ESP-IDF's `esp_ota_img_states_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageState {
    New,
    PendingVerify,
    Valid,
    Invalid,
    Aborted,
    Undefined,
}

impl ImageState {
    pub(crate) fn code(self) -> u32 {
        match self {
            ImageState::New => 0,
            ImageState::PendingVerify => 1,
            ImageState::Valid => 2,
            ImageState::Invalid => 3,
            ImageState::Aborted => 4,
            ImageState::Undefined => u32::MAX,
        }
    }

    pub(crate) fn from_code(c: u32) -> ImageState {
        match c {
            0 => ImageState::New,
            1 => ImageState::PendingVerify,
            2 => ImageState::Valid,
            3 => ImageState::Invalid,
            4 => ImageState::Aborted,
            _ => ImageState::Undefined,
        }
    }
}

/// The two image slots and the otadata that selects between them, as an update uses them.
///
/// Offsets of the `*_next` methods are relative to the start of the slot the next image goes
/// to (the one not running); an implementation refuses what would leave that slot.
pub trait OtaSlots {
    /// The flash's erase block; a slot's length is a multiple of it.
    const ERASE_BLOCK: usize;
    /// Writes start at, and are a multiple of, this many bytes.
    const WRITE_ALIGN: usize;

    /// Length of each slot.
    fn slot_len(&self) -> usize;
    /// The slot running now (0 on a chip never updated).
    fn running_slot(&self) -> usize;
    /// The running image's state as otadata records it; `None` on a chip never updated.
    fn running_state(&self) -> Option<ImageState>;
    /// Records a new state for the running image (VALID after its health check; the
    /// bootloader's NEW -> PENDING_VERIFY).
    fn set_running_state(&mut self, state: ImageState) -> Result<(), FlashError>;

    fn read_next(&self, offset: usize, buf: &mut [u8]);
    fn erase_next(&mut self, offset: usize) -> Result<(), FlashError>;
    fn write_next(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError>;

    /// The slot the next image went to boots at the next reset, its image NEW. Only after the
    /// image there was written and verified.
    fn activate_next(&mut self) -> Result<(), FlashError>;
    /// Gives the running image up: the other slot, which ran before, boots at the next reset,
    /// VALID.
    fn roll_back(&mut self) -> Result<(), FlashError>;

    /// Marks the running image VALID if it is on probation (PENDING_VERIFY); otherwise
    /// nothing changes.
    fn confirm(&mut self) -> Result<(), FlashError> {
        if self.running_state() == Some(ImageState::PendingVerify) {
            self.set_running_state(ImageState::Valid)
        } else {
            Ok(())
        }
    }
}

/// A borrowed flash is a flash: an [`crate::otadata::OtaData`] can work on one it does not own.
impl<F: Flash> Flash for &mut F {
    const ERASE_BLOCK: usize = F::ERASE_BLOCK;
    const WRITE_ALIGN: usize = F::WRITE_ALIGN;
    fn read(&self, offset: usize, buf: &mut [u8]) {
        (**self).read(offset, buf)
    }
    fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
        (**self).erase(offset)
    }
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        (**self).write(offset, data)
    }
}

/// Boots an unconfirmed image may take before the agent's bootloader rolls it back (the app
/// counts the boots in NVS).
///
/// ESP-IDF's bootloader (with `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`) gives an image one
/// boot: at the next reset it marks a PENDING_VERIFY entry ABORTED, and the other entry wins.
/// The virtual chip allows three so that an image crashing once (a brown-out, a watchdog
/// while Wi-Fi comes up) is not given up at once. A chip running ESP-IDF's bootloader rolls
/// back after one; the server sees ROLLED_BACK either way.
pub const MAX_UNCONFIRMED_BOOTS: u32 = 3;
