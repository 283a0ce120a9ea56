//! CSR handling on `/sign-csr`: whatever PEM a caller sends, the CA refuses it or issues a
//! certificate whose CN is the device id it was asked for, never a panic.
#![no_main]

use std::sync::OnceLock;

use flotilla_pki::{CertificateAuthority, certificate_identity};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flotilla-fuzz-ca-{}", std::process::id()));
        CertificateAuthority::load_or_create(&dir).expect("fuzz CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(issued) = ca().sign_device_csr(pem, "dev-fuzz") {
        let (_, cn) = certificate_identity(&issued.certificate_pem).expect("issued cert parses");
        assert_eq!(cn, "dev-fuzz");
    }
});
