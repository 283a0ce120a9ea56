//! The virtual chip's ESP-IDF partition table: the binary table at flash offset 0x8000 that
//! the bootloader reads to find otadata and the app slots (32-byte entries, an MD5 row, 0xFF
//! to 0xC00 bytes, as `gen_esp32part.py` writes them). The layout is the one the ESP32-C3
//! firmware uses (nvs, otadata, phy_init, ota_0, ota_1), with the slot size the agent is
//! given.

use md5::{Digest, Md5};

/// `CONFIG_PARTITION_TABLE_OFFSET`.
pub const TABLE_OFFSET: usize = 0x8000;
/// `ESP_PARTITION_TABLE_MAX_LEN`.
pub const TABLE_LEN: usize = 0xC00;
const ENTRY_LEN: usize = 32;
const ENTRY_MAGIC: [u8; 2] = [0xAA, 0x50];
const MD5_MAGIC: [u8; 2] = [0xEB, 0xEB];
/// App partitions start on a 64 KiB boundary (the MMU page).
pub const APP_ALIGN: usize = 0x1_0000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub label: &'static str,
    pub kind: u8,
    pub subtype: u8,
    pub offset: u32,
    pub size: u32,
}

pub const TYPE_APP: u8 = 0x00;
pub const TYPE_DATA: u8 = 0x01;
pub const SUBTYPE_OTA_0: u8 = 0x10;
pub const SUBTYPE_OTA_1: u8 = 0x11;
pub const SUBTYPE_DATA_OTA: u8 = 0x00;
pub const SUBTYPE_DATA_PHY: u8 = 0x01;
pub const SUBTYPE_DATA_NVS: u8 = 0x02;
pub const OTADATA_OFFSET: usize = 0xD000;
pub const FIRST_SLOT: usize = 0x1_0000;

/// The table for two app slots of `slot_len` bytes (rounded up to 64 KiB).
pub fn table(slot_len: usize) -> Vec<Partition> {
    let slot = slot_len.div_ceil(APP_ALIGN) * APP_ALIGN;
    let p = |label, kind, subtype, offset: usize, size: usize| Partition {
        label,
        kind,
        subtype,
        offset: offset as u32,
        size: size as u32,
    };
    vec![
        p("nvs", TYPE_DATA, SUBTYPE_DATA_NVS, 0x9000, 0x4000),
        p(
            "otadata",
            TYPE_DATA,
            SUBTYPE_DATA_OTA,
            OTADATA_OFFSET,
            0x2000,
        ),
        p("phy_init", TYPE_DATA, SUBTYPE_DATA_PHY, 0xF000, 0x1000),
        p("ota_0", TYPE_APP, SUBTYPE_OTA_0, FIRST_SLOT, slot),
        p("ota_1", TYPE_APP, SUBTYPE_OTA_1, FIRST_SLOT + slot, slot),
    ]
}

/// The binary form, `TABLE_LEN` bytes.
pub fn encode(partitions: &[Partition]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TABLE_LEN);
    for p in partitions {
        out.extend_from_slice(&ENTRY_MAGIC);
        out.extend_from_slice(&[p.kind, p.subtype]);
        out.extend_from_slice(&p.offset.to_le_bytes());
        out.extend_from_slice(&p.size.to_le_bytes());
        let mut label = [0u8; 16];
        label[..p.label.len()].copy_from_slice(p.label.as_bytes());
        out.extend_from_slice(&label);
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    let digest = Md5::digest(&out);
    out.extend_from_slice(&MD5_MAGIC);
    out.extend_from_slice(&[0xFF; 14]);
    out.extend_from_slice(&digest);
    out.resize(TABLE_LEN, 0xFF);
    out
}

/// One entry as read back: (type, subtype, offset, size, label).
pub type Entry = (u8, u8, u32, u32, String);

/// Reads a binary table as the bootloader does: entries until the first erased row, an MD5
/// row that must match the entries before it.
pub fn decode(bin: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut md5 = Md5::new();
    let mut checked = false;
    for row in bin.chunks_exact(ENTRY_LEN) {
        if row[..2] == MD5_MAGIC {
            if md5.clone().finalize().as_slice() != &row[16..32] {
                return Err("partition table MD5 does not match its entries".into());
            }
            checked = true;
        } else if row[..2] == ENTRY_MAGIC {
            let word = |i: usize| u32::from_le_bytes([row[i], row[i + 1], row[i + 2], row[i + 3]]);
            let label = &row[12..28];
            let end = label.iter().position(|b| *b == 0).unwrap_or(16);
            let label = String::from_utf8_lossy(&label[..end]).into_owned();
            entries.push((row[2], row[3], word(4), word(8), label));
            md5.update(row);
        } else if row.iter().all(|b| *b == 0xFF) {
            return if checked {
                Ok(entries)
            } else {
                Err("partition table has no MD5 row".into())
            };
        } else {
            return Err(format!(
                "partition table row {} is not an entry",
                entries.len()
            ));
        }
    }
    Err("partition table has no end".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The same table as ESP-IDF's CSV, read by esp-idf-part (esp-rs, what espflash uses).
    const CSV: &str = "# Name,   Type, SubType, Offset,  Size
nvs,      data, nvs,     0x9000,  0x4000,
otadata,  data, ota,     0xd000,  0x2000,
phy_init, data, phy,     0xf000,  0x1000,
ota_0,    app,  ota_0,   0x10000, 0x1E0000,
ota_1,    app,  ota_1,   0x1F0000, 0x1E0000,
";

    #[test]
    fn the_table_is_byte_for_byte_what_esp_idf_tools_make_from_the_csv() {
        let ours = encode(&table(1_920 * 1024));
        let theirs = esp_idf_part::PartitionTable::try_from_str(CSV).unwrap();
        assert_eq!(ours, theirs.to_bin().unwrap());
        let parsed = esp_idf_part::PartitionTable::try_from_bytes(ours.clone()).unwrap();
        assert_eq!(parsed, theirs);
        let back = decode(&ours).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back[3], (0x00, 0x10, 0x10000, 0x1E0000, "ota_0".into()));
    }

    #[test]
    fn slots_are_rounded_up_to_whole_mmu_pages() {
        let t = table(100_000);
        assert_eq!(t[3].size, 0x20000);
        assert_eq!(t[4].offset, 0x30000);
        esp_idf_part::PartitionTable::try_from_bytes(encode(&t)).unwrap();
    }

    #[test]
    fn a_damaged_table_is_refused() {
        let good = encode(&table(0x20000));
        let mut bad = good.clone();
        bad[5] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("MD5"));
        bad = good.clone();
        bad[5 * 32..6 * 32].fill(0xFF);
        assert!(decode(&bad).unwrap_err().contains("no MD5"));
        bad = good;
        bad[0] = 0;
        assert!(decode(&bad).is_err());
        assert!(decode(&[0xFF; 31]).is_err());
    }
}
