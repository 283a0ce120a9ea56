//! NOR flash that loses power at one chosen operation, for the power-loss suite.

use flotilla_device_core::slots::{Flash, FlashError};

/// How a power cut meets the flash operation it interrupts: nothing of it done, or part of it
/// (the first `done` words of a write, the first `done` quarters of an erase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The number of the operation cut (0 = the first after [`CutFlash::arm`]).
    pub op: usize,
    pub done: usize,
}

/// NOR flash with erase blocks, write alignment, no writes to unerased bytes, and a power cut
/// at one operation ([`Cut`]). It records the length of every operation, so a test can list
/// the cuts worth trying ([`CutFlash::cuts`]).
#[derive(Clone)]
pub struct CutFlash {
    pub mem: Vec<u8>,
    pub ops: usize,
    pub cut: Option<Cut>,
    /// For each operation since the last [`CutFlash::arm`]: how many shapes of tear it has
    /// (write: its words; erase: 4 quarters).
    pub units: Vec<usize>,
}

pub const CUT_BLOCK: usize = 4096;
const WORD: usize = 4;

impl CutFlash {
    pub fn new(len: usize) -> Self {
        CutFlash {
            mem: vec![0xFF; len],
            ops: 0,
            cut: None,
            units: Vec::new(),
        }
    }

    /// Starts counting operations from here; `cut` the one to interrupt.
    pub fn arm(&mut self, cut: Option<Cut>) {
        self.ops = 0;
        self.cut = cut;
        self.units.clear();
    }

    /// Every distinct cut of the operations recorded: before each, and torn after a quarter,
    /// a half and three quarters of it (rounded to whole words, never the whole operation).
    pub fn cuts(&self) -> Vec<Cut> {
        let mut cuts = Vec::new();
        for (op, &units) in self.units.iter().enumerate() {
            let mut done: Vec<usize> = [
                0,
                units.div_ceil(4),
                units.div_ceil(2),
                (3 * units).div_ceil(4),
            ]
            .into_iter()
            .map(|d| d.min(units.saturating_sub(1)))
            .collect();
            done.dedup();
            cuts.extend(done.into_iter().map(|done| Cut { op, done }));
        }
        cuts
    }

    /// Counts the operation; the share of it done before the power went, if this is the cut.
    fn tick(&mut self, units: usize) -> Option<usize> {
        self.units.push(units);
        let op = self.ops;
        self.ops += 1;
        self.cut.filter(|c| c.op == op).map(|c| c.done)
    }
}

impl Flash for CutFlash {
    const ERASE_BLOCK: usize = CUT_BLOCK;
    const WRITE_ALIGN: usize = WORD;

    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self.mem[offset..offset + buf.len()]);
    }

    fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
        if !offset.is_multiple_of(CUT_BLOCK) || offset + CUT_BLOCK > self.mem.len() {
            return Err(FlashError::Misaligned);
        }
        if let Some(quarters) = self.tick(4) {
            self.mem[offset..offset + quarters * CUT_BLOCK / 4].fill(0xFF);
            return Err(FlashError::PowerLost);
        }
        self.mem[offset..offset + CUT_BLOCK].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
        if !offset.is_multiple_of(WORD)
            || !data.len().is_multiple_of(WORD)
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
        let torn = self.tick(data.len() / WORD);
        let n = torn.map_or(data.len(), |words| words * WORD);
        self.mem[offset..offset + n].copy_from_slice(&data[..n]);
        match torn {
            Some(_) => Err(FlashError::PowerLost),
            None => Ok(()),
        }
    }
}
