//! The firmware download's `Range` header: never a panic, and what it grants lies inside the
//! image.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/server/src/routes/range.rs"]
#[allow(dead_code)]
mod range;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Some((start, end)) = range::parse_range(header, size) {
        assert!(
            start <= end && end < size,
            "{header:?} of {size} gave {start}-{end}"
        );
    }
});
