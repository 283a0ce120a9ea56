//! Signed firmware manifests: what a release says about its image, and the operator's
//! signature over exactly those bytes. The server stores and forwards them but cannot make
//! one: the signing key stays with the operator's CLI.

use alloc::string::String;
use serde::{Deserialize, Serialize};

/// What a release promises about its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareManifest {
    /// `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// Hardware/product the image is built for, e.g. `esp32c3`.
    pub hardware: String,
    /// Image size in bytes.
    pub size: u64,
    /// SHA-256 of the image, lower-case hex.
    pub sha256: String,
    /// Anti-rollback counter: a device never installs an image with a lower one.
    pub security_counter: u32,
    /// Unix seconds when the manifest was signed.
    pub issued_at: u64,
    /// Unix seconds after which the manifest must not be installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A manifest with its ECDSA P-256 signature. `manifest` holds the exact JSON text that was
/// signed, so no canonical form is needed: a verifier checks these bytes, then parses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    pub manifest: String,
    /// The signature over `manifest`'s bytes (SHA-256, ECDSA P-256), as 64 bytes `r || s` in hex.
    pub signature: String,
}

/// `devices/{id}/ota`: an offer to update. The device checks `manifest` itself before it
/// downloads a byte; the server cannot forge it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaOffer {
    /// Identifies this offer in `ota/status` reports and the server's history.
    pub id: String,
    pub manifest: SignedManifest,
    /// HTTPS URL of the image on the device listener (client certificate required, Range supported).
    pub url: String,
    /// Allows an older version (never a lower security counter).
    #[serde(default)]
    pub force: bool,
}

/// `devices/{id}/ota`, beside offers: the server withdrew offer `cancel` (an operator
/// cancelled it, or a newer offer replaced it). A device downloading that update stops and
/// reports it FAILED; one that already installed it, or never started it, ignores this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaCancel {
    pub cancel: String,
}
