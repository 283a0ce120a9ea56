//! The release public keys this server accepts releases from. The server holds only public
//! keys: it can refuse a forged release but never make one.

use std::path::PathBuf;

use anyhow::Context;
use flotilla_device_core::ota::verify_signature;
use flotilla_proto::{FirmwareManifest, SignedManifest};
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey;

#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    pub fn load(paths: &[PathBuf]) -> anyhow::Result<TrustedKeys> {
        let keys = paths
            .iter()
            .map(|path| {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading release key {}", path.display()))?;
                VerifyingKey::from_public_key_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("{}: not a P-256 public key: {e}", path.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The manifest, if a trusted key signed exactly these bytes.
    pub fn verify(&self, signed: &SignedManifest) -> Result<FirmwareManifest, String> {
        verify_signature(signed, &self.keys)
            .map(|(manifest, _)| manifest)
            .map_err(|r| r.reason().to_string())
    }
}
