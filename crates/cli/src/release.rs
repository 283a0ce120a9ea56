//! Offline release tooling: the signing key is made and kept here, never sent to the server.

use std::path::{Path, PathBuf};

use flotilla_device_core::app_image;
use flotilla_device_core::ota::{ImageCheck, Running, to_hex, verify_offer};
use flotilla_proto::{FirmwareManifest, SignedManifest};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use sha2::{Digest, Sha256};

use crate::api::ApiFailure;

fn fail(what: &str, e: impl std::fmt::Display) -> ApiFailure {
    ApiFailure::other(format!("{what}: {e}"))
}

/// Writes `<out>.key` (PKCS#8, mode 0600) and `<out>.pub` (SPKI); refuses to overwrite a key.
pub fn keygen(out: &Path) -> Result<(PathBuf, PathBuf), ApiFailure> {
    let key_path = out.with_extension("key");
    let pub_path = out.with_extension("pub");
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>().into())
        .map_err(|e| fail("generating key", e))?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| fail("encoding key", e))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(&key_path)
        .map_err(|e| fail(&format!("creating {}", key_path.display()), e))?;
    std::io::Write::write_all(&mut f, pem.as_bytes()).map_err(|e| fail("writing key", e))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| fail("encoding public key", e))?;
    std::fs::write(&pub_path, public).map_err(|e| fail("writing public key", e))?;
    Ok((key_path, pub_path))
}

/// SHA-256 of a file, lower-case hex (seed 001's generate_firmware_hash).
pub fn hash(path: &Path) -> Result<(String, u64), ApiFailure> {
    let bytes = std::fs::read(path).map_err(|e| fail(&format!("reading {}", path.display()), e))?;
    Ok((to_hex(&Sha256::digest(&bytes)), bytes.len() as u64))
}

pub struct SignRequest<'a> {
    pub firmware: &'a Path,
    pub key: &'a Path,
    /// What the image's app descriptor must say, if given: it is what is signed.
    pub version: Option<&'a str>,
    pub hardware: Option<&'a str>,
    pub security_counter: Option<u32>,
    pub expires_at: Option<u64>,
}

/// What an ESP32 app image says of itself.
struct Described {
    version: String,
    project_name: String,
    secure_version: u32,
}

/// The app descriptor of an ESP32 app image; an error for a file of another kind, or one that
/// starts as an ESP32 image but does not verify (a truncated or damaged build): a device would
/// refuse it after downloading it, as its bootloader could not boot it.
fn described(image: &[u8]) -> Result<Described, ApiFailure> {
    let info = app_image::verify(image.len(), |at, buf| {
        buf.copy_from_slice(&image[at..at + buf.len()])
    })
    .map_err(|e| ApiFailure::usage(format!("not a valid ESP32 app image: {e:?}")))?;
    let Some(desc) = info.app_desc() else {
        return Err(ApiFailure::usage(
            "the ESP32 app image has no app descriptor (esp_app_desc_t) in its first segment",
        ));
    };
    let text = |field: Option<&str>, what: &str| {
        field
            .map(str::to_owned)
            .ok_or_else(|| ApiFailure::usage(format!("the app descriptor's {what} is not text")))
    };
    Ok(Described {
        version: text(desc.version(), "version")?,
        project_name: text(desc.project_name(), "project name")?,
        secure_version: desc.secure_version(),
    })
}

/// The descriptor's field, which a flag given on the command line must repeat: a manifest
/// that says another version, hardware or counter than the image would mislead every rollout,
/// and the device refuses it.
fn resolve<T: PartialEq + std::fmt::Display>(
    flag: &str,
    given: Option<T>,
    described: T,
) -> Result<T, ApiFailure> {
    match given {
        Some(g) if g != described => Err(ApiFailure::usage(format!(
            "--{flag} {g} disagrees with the image's app descriptor ({described})"
        ))),
        _ => Ok(described),
    }
}

/// Signs a release; writes `<firmware>.manifest.json` and returns its path.
pub fn sign(req: &SignRequest<'_>) -> Result<PathBuf, ApiFailure> {
    let image = std::fs::read(req.firmware)
        .map_err(|e| fail(&format!("reading {}", req.firmware.display()), e))?;
    let described = described(&image)?;
    let version = resolve("version", req.version.map(str::to_owned), described.version)?;
    let hardware = resolve(
        "hardware",
        req.hardware.map(str::to_owned),
        described.project_name,
    )?;
    let security_counter = resolve(
        "security-counter",
        req.security_counter,
        described.secure_version,
    )?;
    version
        .parse::<flotilla_proto::FirmwareVersion>()
        .map_err(|e| ApiFailure::usage(format!("the app descriptor's version {version:?}: {e}")))?;
    if hardware.is_empty() {
        return Err(ApiFailure::usage(
            "the app descriptor's project name is empty",
        ));
    }
    let pem = std::fs::read_to_string(req.key)
        .map_err(|e| fail(&format!("reading {}", req.key.display()), e))?;
    let key = SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| fail("release key is not a P-256 PKCS#8 key", e))?;
    let (sha256, size) = (to_hex(&Sha256::digest(&image)), image.len() as u64);
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let manifest = FirmwareManifest {
        version,
        hardware,
        size,
        sha256,
        security_counter,
        issued_at,
        expires_at: req.expires_at,
    };
    let text = serde_json::to_string(&manifest).map_err(|e| fail("encoding manifest", e))?;
    let signature: Signature = key.sign(text.as_bytes());
    let signed = SignedManifest {
        manifest: text,
        signature: to_hex(&signature.to_bytes()),
    };
    let out = PathBuf::from(format!("{}.manifest.json", req.firmware.display()));
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&signed).map_err(|e| fail("encoding", e))?,
    )
    .map_err(|e| fail("writing manifest", e))?;
    Ok(out)
}

/// Verifies an image and its manifest as a device would, against one public key.
pub fn verify(
    firmware: &Path,
    manifest: &Path,
    public_key: &Path,
) -> Result<FirmwareManifest, ApiFailure> {
    let key_pem = std::fs::read_to_string(public_key).map_err(|e| fail("reading public key", e))?;
    let key = VerifyingKey::from_public_key_pem(&key_pem).map_err(|e| fail("public key", e))?;
    let signed: SignedManifest =
        serde_json::from_slice(&std::fs::read(manifest).map_err(|e| fail("reading manifest", e))?)
            .map_err(|e| fail("manifest file", e))?;
    // Structural checks only: version and counter policy belong to the device receiving it.
    let text: FirmwareManifest =
        serde_json::from_str(&signed.manifest).map_err(|e| fail("manifest", e))?;
    let running = Running {
        hardware: &text.hardware,
        version: flotilla_proto::FirmwareVersion {
            major: 0,
            minor: 0,
            patch: 0,
        },
        security_counter: 0,
        now: None,
    };
    let m = verify_offer(&signed, &[key], &running, true)
        .map_err(|e| ApiFailure::other(format!("manifest refused: {e:?}")))?;
    let mut check = ImageCheck::new(&m).map_err(|e| ApiFailure::other(format!("{e:?}")))?;
    let image = std::fs::read(firmware).map_err(|e| fail("reading firmware", e))?;
    for chunk in image.chunks(64 * 1024) {
        check
            .update(chunk)
            .map_err(|e| ApiFailure::other(format!("image refused: {e:?}")))?;
    }
    check
        .finish()
        .map_err(|e| ApiFailure::other(format!("image refused: {e:?}")))?;
    Ok(m)
}
