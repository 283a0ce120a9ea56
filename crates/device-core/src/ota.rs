//! The device's checks on an OTA offer, made before a single byte is downloaded or activated:
//! the signature against the release keys baked into the firmware (several, so a new key can
//! be trusted before the old one retires), the hardware, the version and the anti-rollback
//! counter, the expiry; then, while the image streams in, its size and SHA-256.
//! Writing the image to its slot is [`crate::install`]; the A/B slots are [`crate::slots`].

use alloc::string::String;

use flotilla_proto::{FirmwareManifest, FirmwareVersion, SignedManifest};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Why an offer or an image was refused. Every variant leaves the running image untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtaRejection {
    /// The signature is not 64 hex-encoded bytes, or no trusted key verifies it.
    BadSignature,
    /// The signed bytes are not a manifest.
    MalformedManifest,
    WrongHardware,
    /// Not newer than the running version (and not forced).
    NotNewer,
    /// The security counter is lower than the running image's.
    CounterRollback,
    Expired,
    /// More bytes arrived than the manifest declares.
    TooLarge,
    /// Fewer bytes than declared.
    Truncated,
    HashMismatch,
    /// The declared size does not fit the inactive slot.
    TooLargeForSlot,
    /// The bytes the manifest vouches for are not an app image the bootloader would boot.
    NotAnAppImage,
    /// The image's app descriptor names another version, project or security counter than
    /// its manifest: after the reboot the device would be what the descriptor says.
    DescriptorMismatch,
}

impl OtaRejection {
    /// The reason as reported on `ota/status`.
    pub fn reason(&self) -> &'static str {
        match self {
            OtaRejection::BadSignature => "signature not valid for any trusted release key",
            OtaRejection::MalformedManifest => "malformed manifest",
            OtaRejection::WrongHardware => "built for other hardware",
            OtaRejection::NotNewer => "version is not newer than the running one",
            OtaRejection::CounterRollback => "security counter lower than the running image's",
            OtaRejection::Expired => "manifest expired",
            OtaRejection::TooLarge => "image larger than declared",
            OtaRejection::Truncated => "image shorter than declared",
            OtaRejection::HashMismatch => "image SHA-256 does not match the manifest",
            OtaRejection::TooLargeForSlot => "image larger than the slot",
            OtaRejection::NotAnAppImage => "not an ESP32-C3 app image the bootloader would boot",
            OtaRejection::DescriptorMismatch => "app descriptor disagrees with the manifest",
        }
    }
}

/// What the device is running, for comparison with an offer.
#[derive(Debug, Clone)]
pub struct Running<'a> {
    pub hardware: &'a str,
    pub version: FirmwareVersion,
    pub security_counter: u32,
    /// Unix seconds, when the device knows the time.
    pub now: Option<u64>,
}

/// Checks an offer. `force` allows an older version (an emergency downgrade), but never a
/// lower security counter.
pub fn verify_offer(
    offer: &SignedManifest,
    trusted: &[VerifyingKey],
    running: &Running<'_>,
    force: bool,
) -> Result<FirmwareManifest, OtaRejection> {
    let (manifest, version) = verify_signature(offer, trusted)?;
    if manifest.hardware != running.hardware {
        return Err(OtaRejection::WrongHardware);
    }
    if manifest.security_counter < running.security_counter {
        return Err(OtaRejection::CounterRollback);
    }
    if !force && version <= running.version {
        return Err(OtaRejection::NotNewer);
    }
    if let (Some(expiry), Some(now)) = (manifest.expires_at, running.now)
        && now >= expiry
    {
        return Err(OtaRejection::Expired);
    }
    Ok(manifest)
}

/// Checks the signature against the trusted keys and that the signed bytes are a well-formed
/// manifest; returns it with its parsed version. The server runs this too, at publish time.
pub fn verify_signature(
    offer: &SignedManifest,
    trusted: &[VerifyingKey],
) -> Result<(FirmwareManifest, FirmwareVersion), OtaRejection> {
    let sig_bytes = decode_hex::<64>(&offer.signature).ok_or(OtaRejection::BadSignature)?;
    let signature = Signature::from_slice(&sig_bytes).map_err(|_| OtaRejection::BadSignature)?;
    let message = offer.manifest.as_bytes();
    if !trusted
        .iter()
        .any(|k| k.verify(message, &signature).is_ok())
    {
        return Err(OtaRejection::BadSignature);
    }
    let manifest: FirmwareManifest =
        serde_json::from_slice(message).map_err(|_| OtaRejection::MalformedManifest)?;
    let version: FirmwareVersion = manifest
        .version
        .parse()
        .map_err(|_| OtaRejection::MalformedManifest)?;
    if decode_hex::<32>(&manifest.sha256).is_none() || manifest.hardware.is_empty() {
        return Err(OtaRejection::MalformedManifest);
    }
    Ok((manifest, version))
}

/// Checks an image as it streams in, in bounded memory.
#[derive(Debug, Clone)]
pub struct ImageCheck {
    hasher: Sha256,
    received: u64,
    size: u64,
    expected: [u8; 32],
}

impl ImageCheck {
    pub fn new(manifest: &FirmwareManifest) -> Result<Self, OtaRejection> {
        let expected = decode_hex::<32>(&manifest.sha256).ok_or(OtaRejection::MalformedManifest)?;
        Ok(ImageCheck {
            hasher: Sha256::new(),
            received: 0,
            size: manifest.size,
            expected,
        })
    }

    /// Feeds the next chunk; refuses as soon as the image outgrows its declared size, so a
    /// server that streams forever is stopped there.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), OtaRejection> {
        let received = self.received.saturating_add(chunk.len() as u64);
        if received > self.size {
            return Err(OtaRejection::TooLarge);
        }
        self.received = received;
        self.hasher.update(chunk);
        Ok(())
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn finish(self) -> Result<(), OtaRejection> {
        if self.received < self.size {
            return Err(OtaRejection::Truncated);
        }
        if self.hasher.finalize().as_slice() != self.expected {
            return Err(OtaRejection::HashMismatch);
        }
        Ok(())
    }
}

/// Lower-case hex of bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| {
            [
                DIGITS[(b >> 4) as usize] as char,
                DIGITS[(b & 15) as usize] as char,
            ]
        })
        .collect()
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}
