//! A signed manifest as a device receives it: parsing and the signature check never panic,
//! and nothing is accepted that the trusted key did not sign.
#![no_main]

use std::sync::OnceLock;

use flotilla_device_core::ota::{Running, verify_offer};
use flotilla_proto::{FirmwareVersion, OtaOffer, decode};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::{SigningKey, VerifyingKey};

/// A key nobody outside this target holds: a fuzzer cannot forge its signatures.
fn trusted() -> &'static [VerifyingKey; 1] {
    static KEY: OnceLock<[VerifyingKey; 1]> = OnceLock::new();
    KEY.get_or_init(|| {
        [VerifyingKey::from(
            &SigningKey::from_slice(&[7u8; 32]).expect("fixed scalar"),
        )]
    })
}

fuzz_target!(|payload: &[u8]| {
    let trusted = trusted();
    let Ok(offer) = decode::<OtaOffer>(payload) else {
        return;
    };
    let running = Running {
        hardware: "esp32c3",
        version: "1.0.0".parse::<FirmwareVersion>().expect("version"),
        security_counter: 0,
        now: Some(1_800_000_000),
    };
    for force in [false, true] {
        assert!(
            verify_offer(&offer.manifest, trusted, &running, force).is_err(),
            "an offer the fuzzer made was accepted"
        );
    }
});
