//! Every bad offer or image is refused before activation; a good one passes.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_device_core::ota::{ImageCheck, OtaRejection, Running, verify_offer};
use flotilla_proto::SignedManifest;
use p256::ecdsa::VerifyingKey;

mod common;
use common::{key, manifest, sign};

fn running() -> Running<'static> {
    Running {
        hardware: "esp32c3",
        version: "1.2.0".parse().unwrap(),
        security_counter: 3,
        now: Some(1_850_000_000),
    }
}

fn trusted() -> Vec<VerifyingKey> {
    vec![*key(1).verifying_key(), *key(2).verifying_key()]
}

#[test]
fn a_good_offer_and_image_pass_with_either_trusted_key() {
    let image = vec![7u8; 5000];
    for signer in [key(1), key(2)] {
        let m = verify_offer(
            &sign(&signer, &manifest("1.3.0", &image)),
            &trusted(),
            &running(),
            false,
        )
        .unwrap();
        let mut check = ImageCheck::new(&m).unwrap();
        for chunk in image.chunks(512) {
            check.update(chunk).unwrap();
        }
        check.finish().unwrap();
    }
}

#[test]
fn tampered_unsigned_or_foreign_offers_are_refused() {
    let image = vec![1u8; 100];
    let good = sign(&key(1), &manifest("1.3.0", &image));
    // A bit flip in the manifest.
    let mut flipped = good.clone();
    flipped.manifest = flipped.manifest.replace("1.3.0", "1.3.1");
    assert_eq!(
        verify_offer(&flipped, &trusted(), &running(), false),
        Err(OtaRejection::BadSignature)
    );
    // A bit flip in the signature.
    let mut sig = good.clone();
    let last = if sig.signature.ends_with('0') {
        "1"
    } else {
        "0"
    };
    sig.signature.replace_range(127..128, last);
    assert_eq!(
        verify_offer(&sig, &trusted(), &running(), false),
        Err(OtaRejection::BadSignature)
    );
    // Unsigned, and signed by a key the device does not trust.
    let unsigned = SignedManifest {
        manifest: good.manifest.clone(),
        signature: String::new(),
    };
    assert_eq!(
        verify_offer(&unsigned, &trusted(), &running(), false),
        Err(OtaRejection::BadSignature)
    );
    let foreign = sign(&key(9), &manifest("1.3.0", &image));
    assert_eq!(
        verify_offer(&foreign, &trusted(), &running(), false),
        Err(OtaRejection::BadSignature)
    );
}

#[test]
fn wrong_hardware_older_versions_rollbacks_and_expired_offers_are_refused() {
    let image = vec![1u8; 100];
    let mut other_hw = manifest("1.3.0", &image);
    other_hw.hardware = "esp32s3".into();
    assert_eq!(
        verify_offer(&sign(&key(1), &other_hw), &trusted(), &running(), false),
        Err(OtaRejection::WrongHardware)
    );
    let older = sign(&key(1), &manifest("1.1.0", &image));
    assert_eq!(
        verify_offer(&older, &trusted(), &running(), false),
        Err(OtaRejection::NotNewer)
    );
    // Forced: an older version is allowed while its counter is not lower...
    assert!(verify_offer(&older, &trusted(), &running(), true).is_ok());
    // ...but a lower counter never is, forced or not (a replayed old manifest).
    let mut replay = manifest("1.1.0", &image);
    replay.security_counter = 2;
    assert_eq!(
        verify_offer(&sign(&key(1), &replay), &trusted(), &running(), true),
        Err(OtaRejection::CounterRollback)
    );
    let mut expired = manifest("1.3.0", &image);
    expired.expires_at = Some(1_840_000_000);
    assert_eq!(
        verify_offer(&sign(&key(1), &expired), &trusted(), &running(), false),
        Err(OtaRejection::Expired)
    );
}

#[test]
fn images_that_differ_from_their_manifest_are_refused() {
    let image = vec![5u8; 2048];
    let m = manifest("1.3.0", &image);
    // Truncated.
    let mut c = ImageCheck::new(&m).unwrap();
    c.update(&image[..1000]).unwrap();
    assert_eq!(c.finish(), Err(OtaRejection::Truncated));
    // Larger than declared: stopped at the declared size, however long the server streams.
    let mut c = ImageCheck::new(&m).unwrap();
    c.update(&image).unwrap();
    assert_eq!(c.update(&[0]), Err(OtaRejection::TooLarge));
    // A bit flip in the image.
    let mut flipped = image.clone();
    flipped[1000] ^= 1;
    let mut c = ImageCheck::new(&m).unwrap();
    c.update(&flipped).unwrap();
    assert_eq!(c.finish(), Err(OtaRejection::HashMismatch));
    // The manifest of one release with the image of another (same size).
    let other = vec![6u8; 2048];
    let mut c = ImageCheck::new(&m).unwrap();
    c.update(&other).unwrap();
    assert_eq!(c.finish(), Err(OtaRejection::HashMismatch));
}
