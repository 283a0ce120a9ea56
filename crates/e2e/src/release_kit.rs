//! The operator's offline release kit for tests: a signing key pair made by the CLI, and
//! agent images built and signed with it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bin;

/// The operator's offline release kit: a key pair made by the CLI.
pub struct Kit {
    /// Where the key pair and the images are.
    pub dir: PathBuf,
}

impl Kit {
    pub fn new(dir: &Path) -> Kit {
        succeed(
            Command::new(bin("flotilla"))
                .args(["release", "keygen", "--out"])
                .arg(dir.join("release")),
        );
        Kit {
            dir: dir.to_path_buf(),
        }
    }

    pub fn public_key(&self) -> String {
        self.dir.join("release.pub").display().to_string()
    }

    /// Builds an agent image and signs it, the version and hardware read from its app
    /// descriptor; returns the image path (manifest beside it).
    pub fn release(&self, version: &str, behaviour: &str) -> PathBuf {
        self.release_of_size(version, behaviour, None)
    }

    /// [`Kit::release`] with an image of `size` bytes (`flotilla-agent image`'s default when
    /// `None`).
    pub fn release_of_size(&self, version: &str, behaviour: &str, size: Option<usize>) -> PathBuf {
        let image = self.dir.join(format!("fw-{version}.bin"));
        let size = size.map(|s| s.to_string());
        let mut build = Command::new(bin("flotilla-agent"));
        build.args(["image", "--version", version, "--behaviour", behaviour]);
        if let Some(size) = &size {
            build.args(["--size", size]);
        }
        succeed(build.arg("--out").arg(&image));
        succeed(
            Command::new(bin("flotilla"))
                .args(["release", "sign"])
                .arg(&image)
                .arg("--key")
                .arg(self.dir.join("release.key")),
        );
        image
    }
}

impl Kit {
    /// A manifest for `bytes` naming `version` and `hardware`, signed with the kit's key
    /// without the CLI's checks (which refuse what is not the app image it names): what an
    /// operator with a careless script, or an older CLI, could publish. The body for
    /// `POST /api/releases`.
    pub fn sign_anything(&self, bytes: &[u8], version: &str, hardware: &str) -> serde_json::Value {
        use p256::ecdsa::signature::Signer;
        use p256::pkcs8::DecodePrivateKey;
        use sha2::Digest;
        let pem = std::fs::read_to_string(self.dir.join("release.key")).expect("release key");
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).expect("a P-256 key");
        let manifest = serde_json::json!({
            "version": version,
            "hardware": hardware,
            "size": bytes.len(),
            "sha256": hex::encode(sha2::Sha256::digest(bytes)),
            "security_counter": 0,
            "issued_at": 1_800_000_000u64,
        })
        .to_string();
        let signature: p256::ecdsa::Signature = key.sign(manifest.as_bytes());
        serde_json::json!({"manifest": manifest, "signature": hex::encode(signature.to_bytes())})
    }
}

/// The manifest `flotilla release sign` wrote beside `image` (the signed text, parsed).
pub fn signed_manifest(image: &Path) -> serde_json::Value {
    let path = PathBuf::from(format!("{}.manifest.json", image.display()));
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("reading the manifest"))
            .expect("manifest file is JSON");
    let text = file["manifest"].as_str().expect("a signed manifest text");
    serde_json::from_str(text).expect("the signed manifest is JSON")
}

/// Runs a release tool; it must succeed (its stderr is the failure report).
fn succeed(cmd: &mut Command) {
    let out = cmd.output().expect("running a release tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
