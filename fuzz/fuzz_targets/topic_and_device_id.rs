//! Topic and device-id parsing: never a panic, and a parsed topic prints back as itself.
#![no_main]

use flotilla_proto::{DeviceId, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = DeviceId::parse(s) {
        assert_eq!(id.as_str(), s);
    }
    if let Ok((device, channel)) = Topic::parse(s) {
        assert_eq!(Topic::new(&device, channel).as_str(), s);
    }
});
