//! The agent's firmware image: what a Flotilla release contains when the "chip" is this agent.
//! A header line names the format, a JSON line describes the build (version, hardware,
//! anti-rollback counter, and a test behaviour), and filler bytes bring it to a realistic size.
//! The bootloader reads the header from the slot it boots, so an update really changes what
//! runs — and a bad build really crashes or never connects, and really gets rolled back.

use anyhow::Context;
use flotilla_device_core::slots::{Flash, Layout};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8] = b"FLOTILLA-AGENT-IMAGE 1\n";
/// The header must fit here; the rest of the image is filler.
const HEADER_MAX: usize = 1024;

/// How a build behaves once booted (for testing rollback with real images).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    #[default]
    Normal,
    /// Resets shortly after boot, every boot.
    CrashAtBoot,
    /// Runs but cannot reach the broker.
    NeverConnects,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHeader {
    pub version: String,
    pub hardware: String,
    pub security_counter: u32,
    #[serde(default)]
    pub behaviour: Behaviour,
}

/// Builds an image of `size` bytes (at least the header).
pub fn build(header: &ImageHeader, size: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = MAGIC.to_vec();
    out.extend(serde_json::to_vec(header)?);
    out.push(b'\n');
    anyhow::ensure!(out.len() <= HEADER_MAX, "image header too long");
    // Deterministic filler that does not compress to nothing, like real code.
    let mut x: u32 = 0x9E37_79B9;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
    Ok(out)
}

/// The header of the image in `slot`, if it holds one.
pub fn read<F: Flash>(flash: &F, layout: &Layout, slot: usize) -> Option<ImageHeader> {
    let mut buf = [0u8; HEADER_MAX];
    flash.read(layout.slots[slot], &mut buf);
    let rest = buf.strip_prefix(MAGIC)?;
    let end = rest.iter().position(|b| *b == b'\n')?;
    serde_json::from_slice(&rest[..end]).ok()
}

/// Factory flashing: writes `header` as the image in slot 0 (erasing its first block).
pub fn flash_factory<F: Flash>(
    flash: &mut F,
    layout: &Layout,
    header: &ImageHeader,
) -> anyhow::Result<()> {
    let mut bytes = build(header, 0)?;
    bytes.resize(bytes.len().div_ceil(F::WRITE_ALIGN) * F::WRITE_ALIGN, 0xFF);
    flash
        .erase(layout.slots[0])
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("erasing slot 0")?;
    flash
        .write(layout.slots[0], &bytes)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("writing the factory image")
}
