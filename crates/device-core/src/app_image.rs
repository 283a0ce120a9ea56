//! ESP32 application images as ESP-IDF and esptool make them: the image header
//! (`esp_image_header_t` with its extended part), the segments, the checksum byte and the
//! appended SHA-256, and the app descriptor (`esp_app_desc_t`) that opens the first segment.
//!
//! [`verify`] is what a bootloader checks before it boots a slot (every byte read once, from
//! any source); [`AppDesc`] is what says which build an image is; [`build`] lays an image out
//! from its segments, for the virtual chip and for tests.

use alloc::vec::Vec;
use sha2::{Digest, Sha256};

/// `ESP_IMAGE_HEADER_MAGIC`.
pub const IMAGE_MAGIC: u8 = 0xE9;
/// `ESP_APP_DESC_MAGIC_WORD`.
pub const APP_DESC_MAGIC: u32 = 0xABCD_5432;
/// `ESP_CHIP_ID_ESP32C3`.
pub const CHIP_ID_ESP32C3: u16 = 0x0005;
/// `sizeof(esp_image_header_t)`.
pub const HEADER_LEN: usize = 24;
/// `sizeof(esp_image_segment_header_t)`.
pub const SEGMENT_HEADER_LEN: usize = 8;
/// `sizeof(esp_app_desc_t)`.
pub const APP_DESC_LEN: usize = 256;
/// `ESP_IMAGE_MAX_SEGMENTS`.
pub const MAX_SEGMENTS: u8 = 16;
const CHECKSUM_SEED: u8 = 0xEF;
const HASH_APPENDED_AT: usize = 23;

/// Why an image is not bootable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageError {
    /// It ends (or its slot does) before the image does.
    Truncated,
    /// The first byte is not 0xE9.
    BadMagic,
    /// No segment, or more than ESP-IDF's 16.
    SegmentCount(u8),
    /// A segment whose length is not a multiple of 4 (ESP-IDF refuses it).
    UnalignedSegment,
    /// The XOR checksum over the segments' data does not match.
    Checksum,
    /// The header says no SHA-256 is appended (ESP-IDF builds always append one).
    NoHash,
    /// The appended SHA-256 does not match the image.
    Hash,
}

/// What [`verify`] found in a bootable image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Bytes from the header to the end of the appended hash.
    pub len: usize,
    pub chip_id: u16,
    pub entry: u32,
    pub segments: u8,
    /// The first segment's first 256 bytes, when they are an app descriptor.
    desc: Option<[u8; APP_DESC_LEN]>,
}

impl ImageInfo {
    pub fn app_desc(&self) -> Option<AppDesc<'_>> {
        self.desc.as_ref().map(|raw| AppDesc { raw })
    }
}

/// An `esp_app_desc_t`: the build's version and project name, its anti-rollback secure
/// version, and when and with what it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppDesc<'a> {
    raw: &'a [u8; APP_DESC_LEN],
}

impl<'a> AppDesc<'a> {
    /// Reads a descriptor from its 256 bytes, if its magic word is there.
    pub fn parse(raw: &'a [u8; APP_DESC_LEN]) -> Option<AppDesc<'a>> {
        (word(raw, 0) == APP_DESC_MAGIC).then_some(AppDesc { raw })
    }

    /// `secure_version`, the counter anti-rollback compares.
    pub fn secure_version(&self) -> u32 {
        word(self.raw, 4)
    }

    /// `version[32]`; `None` when it is not NUL-terminated UTF-8.
    pub fn version(&self) -> Option<&'a str> {
        c_str(&self.raw[16..48])
    }

    /// `project_name[32]`.
    pub fn project_name(&self) -> Option<&'a str> {
        c_str(&self.raw[48..80])
    }

    /// `time[16]` and `date[16]` of the build.
    pub fn built(&self) -> (Option<&'a str>, Option<&'a str>) {
        (c_str(&self.raw[80..96]), c_str(&self.raw[96..112]))
    }

    /// `idf_ver[32]`.
    pub fn idf_version(&self) -> Option<&'a str> {
        c_str(&self.raw[112..144])
    }
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn c_str(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|b| *b == 0)?;
    core::str::from_utf8(&field[..end]).ok()
}

/// Checks the image that starts at offset 0 of a source `limit` bytes long (a slot, a file),
/// as ESP-IDF's bootloader does before it boots: the header, every segment within bounds and
/// 4-byte aligned, the checksum, and the appended SHA-256. `read(offset, buf)` fills `buf`
/// from the source; it is never asked for bytes at or past `limit`.
pub fn verify(
    limit: usize,
    mut read: impl FnMut(usize, &mut [u8]),
) -> Result<ImageInfo, ImageError> {
    let mut sha = Sha256::new();
    let mut pos = 0usize;
    let mut take = |pos: &mut usize, buf: &mut [u8], sha: &mut Sha256| {
        let end = pos.checked_add(buf.len()).ok_or(ImageError::Truncated)?;
        if end > limit {
            return Err(ImageError::Truncated);
        }
        read(*pos, buf);
        sha.update(&*buf);
        *pos = end;
        Ok(())
    };
    let mut header = [0u8; HEADER_LEN];
    take(&mut pos, &mut header, &mut sha)?;
    if header[0] != IMAGE_MAGIC {
        return Err(ImageError::BadMagic);
    }
    let segments = header[1];
    if segments == 0 || segments > MAX_SEGMENTS {
        return Err(ImageError::SegmentCount(segments));
    }
    let mut checksum = CHECKSUM_SEED;
    let mut desc = None;
    let mut chunk = [0u8; 512];
    for n in 0..segments {
        let mut seg = [0u8; SEGMENT_HEADER_LEN];
        take(&mut pos, &mut seg, &mut sha)?;
        let len = word(&seg, 4) as usize;
        if !len.is_multiple_of(4) {
            return Err(ImageError::UnalignedSegment);
        }
        let mut left = len;
        while left > 0 {
            let buf = &mut chunk[..left.min(512)];
            let at_start = left == len;
            take(&mut pos, buf, &mut sha)?;
            if n == 0 && at_start && buf.len() >= APP_DESC_LEN {
                let mut raw = [0u8; APP_DESC_LEN];
                raw.copy_from_slice(&buf[..APP_DESC_LEN]);
                desc = AppDesc::parse(&raw).is_some().then_some(raw);
            }
            checksum = buf.iter().fold(checksum, |c, b| c ^ b);
            left -= buf.len();
        }
    }
    // Zero padding so the checksum is the last byte of a 16-byte block.
    let mut tail = [0u8; 16];
    let tail = &mut tail[..16 - pos % 16];
    take(&mut pos, tail, &mut sha)?;
    if tail[tail.len() - 1] != checksum {
        return Err(ImageError::Checksum);
    }
    if header[HASH_APPENDED_AT] != 1 {
        return Err(ImageError::NoHash);
    }
    let digest = sha.finalize();
    let mut appended = [0u8; 32];
    if pos + 32 > limit {
        return Err(ImageError::Truncated);
    }
    read(pos, &mut appended);
    if digest.as_slice() != appended {
        return Err(ImageError::Hash);
    }
    Ok(ImageInfo {
        len: pos + 32,
        chip_id: u16::from_le_bytes([header[12], header[13]]),
        entry: word(&header, 4),
        segments,
        desc,
    })
}

/// What goes into an app descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppDescFields<'a> {
    pub version: &'a str,
    pub project_name: &'a str,
    pub secure_version: u32,
    pub time: &'a str,
    pub date: &'a str,
    pub idf_version: &'a str,
}

/// The 256 bytes of an `esp_app_desc_t`; each text is cut to its field, leaving the NUL.
pub fn app_desc(fields: &AppDescFields<'_>) -> [u8; APP_DESC_LEN] {
    let mut d = [0u8; APP_DESC_LEN];
    d[0..4].copy_from_slice(&APP_DESC_MAGIC.to_le_bytes());
    d[4..8].copy_from_slice(&fields.secure_version.to_le_bytes());
    let mut put = |at: usize, len: usize, s: &str| {
        let mut n = s.len().min(len - 1);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        d[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
    };
    put(16, 32, fields.version);
    put(48, 32, fields.project_name);
    put(80, 16, fields.time);
    put(96, 16, fields.date);
    put(112, 32, fields.idf_version);
    // max_efuse_blk_rev_full v1.99, and mmu_page_size: log2 of 64 KiB, as the ESP32-C3
    // maps flash.
    d[178..180].copy_from_slice(&199u16.to_le_bytes());
    d[180] = 16;
    d
}

/// One segment: where it loads and its bytes (padded with zeros to a multiple of 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub load_addr: u32,
    pub data: Vec<u8>,
}

/// An ESP32-C3 image (DIO, 40 MHz, 4 MB flash, as espflash writes by default) of `segments`,
/// with its checksum and SHA-256 appended. At most 16 segments.
pub fn build(entry: u32, segments: &[Segment]) -> Vec<u8> {
    assert!(
        !segments.is_empty() && segments.len() <= usize::from(MAX_SEGMENTS),
        "an image has 1 to 16 segments"
    );
    let mut out = Vec::new();
    out.extend_from_slice(&[IMAGE_MAGIC, segments.len() as u8, 2, 0x20]);
    out.extend_from_slice(&entry.to_le_bytes());
    // Extended header: WP pin unused (0xEE), default drive strengths, chip id, minimum
    // revision v0.3 (legacy 3), maximum v1.99, hash appended.
    out.extend_from_slice(&[0xEE, 0, 0, 0]);
    out.extend_from_slice(&CHIP_ID_ESP32C3.to_le_bytes());
    out.push(3);
    out.extend_from_slice(&3u16.to_le_bytes());
    out.extend_from_slice(&199u16.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 1]);
    let mut checksum = CHECKSUM_SEED;
    for s in segments {
        let len = s.data.len().div_ceil(4) * 4;
        out.extend_from_slice(&s.load_addr.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&s.data);
        out.resize(out.len() + len - s.data.len(), 0);
        checksum = s.data.iter().fold(checksum, |c, b| c ^ b);
    }
    out.resize(out.len() + 15 - out.len() % 16, 0);
    out.push(checksum);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::vec;

    fn fields() -> AppDescFields<'static> {
        AppDescFields {
            version: "1.2.3",
            project_name: "esp32c3",
            secure_version: 7,
            time: "12:00:00",
            date: "Dec  7 2026",
            idf_version: "v5.5",
        }
    }

    fn image() -> Vec<u8> {
        let mut drom = app_desc(&fields()).to_vec();
        drom.extend_from_slice(b"rodata");
        build(
            0x4200_0020,
            &[
                Segment {
                    load_addr: 0x3C00_0020,
                    data: drom,
                },
                Segment {
                    load_addr: 0x4201_0020,
                    data: vec![0x5A; 1001],
                },
            ],
        )
    }

    fn check(img: &[u8]) -> Result<ImageInfo, ImageError> {
        verify(img.len(), |at, buf| {
            buf.copy_from_slice(&img[at..at + buf.len()])
        })
    }

    #[test]
    fn a_built_image_verifies_and_its_descriptor_reads_back() {
        let img = image();
        assert_eq!(img.len() % 16, 0, "16-aligned body plus a 32-byte hash");
        let info = check(&img).unwrap();
        assert_eq!(info.len, img.len());
        assert_eq!(
            (info.chip_id, info.entry, info.segments),
            (5, 0x4200_0020, 2)
        );
        let d = info.app_desc().unwrap();
        assert_eq!(d.version(), Some("1.2.3"));
        assert_eq!(d.project_name(), Some("esp32c3"));
        assert_eq!(d.secure_version(), 7);
        assert_eq!(d.idf_version(), Some("v5.5"));
        assert_eq!(d.built(), (Some("12:00:00"), Some("Dec  7 2026")));
        // Bytes after the image (the rest of a slot) do not matter.
        let mut slot = img.clone();
        slot.resize(img.len() + 4096, 0xFF);
        assert_eq!(check(&slot).unwrap().len, img.len());
    }

    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let img = image();
        for at in 0..img.len() {
            let mut bad = img.clone();
            bad[at] ^= 0x01;
            assert!(check(&bad).is_err(), "a flip at {at} was accepted");
        }
        for len in 0..img.len() {
            assert_eq!(
                check(&img[..len]),
                Err(ImageError::Truncated),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn malformed_headers_get_their_own_errors() {
        let img = image();
        let mut bad = img.clone();
        bad[0] = 0xE8;
        assert_eq!(check(&bad), Err(ImageError::BadMagic));
        bad = img.clone();
        bad[1] = 0;
        assert_eq!(check(&bad), Err(ImageError::SegmentCount(0)));
        bad[1] = 17;
        assert_eq!(check(&bad), Err(ImageError::SegmentCount(17)));
        // A segment length of 2^32 - 1: unaligned, and never read.
        bad = img.clone();
        bad[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(check(&bad), Err(ImageError::UnalignedSegment));
        // A huge aligned length runs off the end instead of allocating or wrapping.
        bad[28..32].copy_from_slice(&0xFFFF_FFFCu32.to_le_bytes());
        assert_eq!(check(&bad), Err(ImageError::Truncated));
    }

    #[test]
    fn long_texts_are_cut_to_their_fields_on_a_char_boundary() {
        let long = "é".repeat(40);
        let d = app_desc(&AppDescFields {
            version: &long,
            ..fields()
        });
        let v = AppDesc::parse(&d).unwrap().version().unwrap();
        assert_eq!(v, "é".repeat(15));
    }
}
