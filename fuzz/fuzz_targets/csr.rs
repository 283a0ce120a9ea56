//! CSR handling on `/sign-csr`: whatever PEM a caller sends, the CA refuses it or issues a
//! certificate that parses back, never a panic.
#![no_main]

use std::sync::OnceLock;

use flotilla_pki::{CertificateAuthority, certificate_identity, normalize_serial};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("flotilla-fuzz-ca-{}-{nanos}", std::process::id()));
        CertificateAuthority::load_or_create(&dir).expect("fuzz CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(pem) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(issued) = ca().sign_device_csr(pem, "dev-fuzz") {
        let (serial, cn) =
            certificate_identity(&issued.certificate_pem).expect("issued cert parses");
        let want = normalize_serial(&issued.serial_hex);
        assert_eq!((serial.as_str(), cn.as_str()), (want.as_str(), "dev-fuzz"));
    }
});
