//! The agent's firmware image: what a Flotilla release contains when the "chip" is this agent.
//! It is an ESP32-C3 app image in ESP-IDF's format (`esptool image-info` reads it): the app
//! descriptor in its first segment names the version, the hardware (as the project name) and
//! the anti-rollback counter (`secure_version`); a build record after it says how the build
//! behaves (for testing rollback), and filler "code" brings it to a realistic size. The
//! bootloader verifies the image in the slot it boots (checksum, SHA-256) and reads what runs
//! from it, so an update really changes what runs — and a bad build really crashes or never
//! connects, and really gets rolled back.

use anyhow::Context;
use flotilla_device_core::app_image::{self, AppDescFields, Segment};
use flotilla_device_core::otadata::Layout;
use flotilla_device_core::slots::Flash;
use serde::{Deserialize, Serialize};

/// Opens the agent's build record, after the app descriptor in the first (DROM) segment.
const RECORD_MAGIC: &[u8] = b"FLOTILLA-AGENT-BUILD 1\n";
/// The record must fit here.
const RECORD_MAX: usize = 512;
/// Where the segments load, as an ESP32-C3 build's do: flash-mapped data (DROM) at the
/// start of the data bus window, flash-mapped code (IROM) a page later in the instruction
/// window, at the same offset within its 64 KiB page as its bytes have in the image (what
/// the MMU needs, and what esptool's elf2image pads for).
const DROM: u32 = 0x3C00_0020;
const IROM_PAGE: u32 = 0x4201_0000;
const PAGE: u32 = 0x1_0000;
/// What fills the descriptor's `idf_ver`: these images are not built with ESP-IDF.
const BUILT_WITH: &str = "flotilla-agent";

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

/// What the agent keeps in its image besides the descriptor: how the build behaves.
#[derive(Serialize, Deserialize)]
struct BuildRecord {
    behaviour: Behaviour,
}

/// Builds an ESP32-C3 app image of about `size` bytes: an app descriptor holding the version,
/// the hardware (as the project name) and the security counter (as `secure_version`), the
/// build record, and filler "code" that does not compress to nothing.
pub fn build(header: &ImageHeader, size: usize) -> anyhow::Result<Vec<u8>> {
    header
        .version
        .parse::<flotilla_proto::FirmwareVersion>()
        .map_err(|e| anyhow::anyhow!("version {:?}: {e}", header.version))?;
    for (what, text) in [("version", &header.version), ("hardware", &header.hardware)] {
        anyhow::ensure!(
            !text.is_empty() && text.len() < 32 && !text.contains('\0'),
            "{what} {text:?} does not fit the app descriptor (1 to 31 bytes)"
        );
    }
    let mut drom = app_image::app_desc(&AppDescFields {
        version: &header.version,
        project_name: &header.hardware,
        secure_version: header.security_counter,
        time: "",
        date: "",
        idf_version: BUILT_WITH,
    })
    .to_vec();
    drom.extend_from_slice(RECORD_MAGIC);
    drom.extend(serde_json::to_vec(&BuildRecord {
        behaviour: header.behaviour,
    })?);
    drom.push(b'\n');
    drom.resize(drom.len().div_ceil(4) * 4, 0);
    // The code segment's bytes start after the header, both segment headers and the DROM.
    let irom_at = app_image::HEADER_LEN + 2 * app_image::SEGMENT_HEADER_LEN + drom.len();
    let overhead = irom_at + 16 + 32;
    let code_len = (size.saturating_sub(overhead) / 4 * 4).max(64);
    let mut code = Vec::with_capacity(code_len);
    let mut x: u32 = 0x9E37_79B9;
    while code.len() < code_len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        code.push(x as u8);
    }
    let irom = IROM_PAGE + (irom_at as u32 % PAGE);
    Ok(app_image::build(
        irom,
        &[
            Segment {
                load_addr: DROM,
                data: drom,
            },
            Segment {
                load_addr: irom,
                data: code,
            },
        ],
    ))
}

/// The build in `slot`, if the slot holds an image that verifies (header, segments,
/// checksum, SHA-256), as the bootloader checks before it boots one.
pub fn read<F: Flash>(flash: &F, layout: &Layout, slot: usize) -> Option<ImageHeader> {
    let base = layout.slots[slot];
    let info = app_image::verify(layout.slot_len, |at, buf| flash.read(base + at, buf)).ok()?;
    let desc = info.app_desc()?;
    let mut record = [0u8; RECORD_MAX];
    let at = app_image::HEADER_LEN + app_image::SEGMENT_HEADER_LEN + app_image::APP_DESC_LEN;
    flash.read(base + at, &mut record);
    let rest = record.strip_prefix(RECORD_MAGIC)?;
    let end = rest.iter().position(|b| *b == b'\n')?;
    let record: BuildRecord = serde_json::from_slice(&rest[..end]).ok()?;
    Some(ImageHeader {
        version: desc.version()?.into(),
        hardware: desc.project_name()?.into(),
        security_counter: desc.secure_version(),
        behaviour: record.behaviour,
    })
}

/// Factory flashing: writes `header`'s image (a small one) into slot 0.
pub fn flash_factory<F: Flash>(
    flash: &mut F,
    layout: &Layout,
    header: &ImageHeader,
) -> anyhow::Result<()> {
    let mut bytes = build(header, 0)?;
    bytes.resize(bytes.len().div_ceil(F::WRITE_ALIGN) * F::WRITE_ALIGN, 0xFF);
    for block in (0..bytes.len()).step_by(F::ERASE_BLOCK) {
        flash
            .erase(layout.slots[0] + block)
            .map_err(|e| anyhow::anyhow!("{e:?}"))
            .context("erasing slot 0")?;
    }
    flash
        .write(layout.slots[0], &bytes)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("writing the factory image")
}
