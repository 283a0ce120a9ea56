//! A signed manifest as a device receives it. The fuzzer's bytes are the manifest text, signed
//! here with a trusted key (a fuzzer cannot forge P-256 signatures, so this is how it reaches
//! the parser and the policy): parsing never panics, and whatever is accepted satisfies the
//! device's rules — its hardware, a security counter not lower, a newer version unless forced,
//! not expired. The same text with a bit of its signature flipped is always refused.
#![no_main]

use std::sync::OnceLock;

use flotilla_device_core::ota::{Running, to_hex, verify_offer};
use flotilla_proto::{FirmwareVersion, SignedManifest};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

fn keys() -> &'static (SigningKey, [VerifyingKey; 1]) {
    static KEYS: OnceLock<(SigningKey, [VerifyingKey; 1])> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signing = SigningKey::from_slice(&[7u8; 32]).expect("fixed scalar");
        let verifying = VerifyingKey::from(&signing);
        (signing, [verifying])
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (signing, trusted) = keys();
    let signature: Signature = signing.sign(text.as_bytes());
    let mut offer = SignedManifest {
        manifest: text.to_string(),
        signature: to_hex(&signature.to_bytes()),
    };
    let running = Running {
        hardware: "esp32c3",
        version: "1.2.3".parse::<FirmwareVersion>().expect("version"),
        security_counter: 5,
        now: Some(1_800_000_000),
    };
    for force in [false, true] {
        if let Ok(m) = verify_offer(&offer, trusted, &running, force) {
            assert_eq!(m.hardware, running.hardware);
            assert!(m.security_counter >= running.security_counter);
            let version: FirmwareVersion = m.version.parse().expect("accepted version parses");
            assert!(
                force || version > running.version,
                "{} not newer",
                m.version
            );
            assert!(m.expires_at.is_none_or(|e| e > 1_800_000_000));
        }
    }
    // Flip one hex digit of the signature: refused, whatever the text.
    let last = offer.signature.pop().unwrap_or('0');
    offer.signature.push(if last == '0' { '1' } else { '0' });
    assert!(verify_offer(&offer, trusted, &running, true).is_err());
});
