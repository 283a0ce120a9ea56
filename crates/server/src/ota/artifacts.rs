//! Where release images live: a local directory by default. An image is written to a
//! temporary file while its size and SHA-256 are checked against the signed manifest, and only
//! renamed into place when both match, so a stored image is always the one the manifest names.

use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use flotilla_proto::FirmwareManifest;

#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

/// Why an upload was refused.
#[derive(Debug)]
pub enum UploadError {
    /// The bytes do not match the manifest.
    Mismatch(String),
    Io(std::io::Error),
}

impl Artifacts {
    pub fn open(dir: &Path) -> std::io::Result<Artifacts> {
        std::fs::create_dir_all(dir)?;
        Ok(Artifacts {
            dir: dir.to_path_buf(),
        })
    }

    /// The image file of a release (versions are validated `MAJOR.MINOR.PATCH`, path-safe).
    pub fn path(&self, version: &str) -> PathBuf {
        self.dir.join(format!("{version}.bin"))
    }

    /// Streams an upload to disk, checking it against `manifest` on the way.
    pub async fn store<S, E>(
        &self,
        version: &str,
        manifest: &FirmwareManifest,
        mut body: S,
    ) -> Result<(), UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = self.dir.join(format!(
            ".{version}.{}.part",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(UploadError::Io)?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| UploadError::Mismatch(format!("upload broken: {e}")))?;
                size += chunk.len() as u64;
                if size > manifest.size {
                    return Err(UploadError::Mismatch(format!(
                        "image is larger than the {} bytes the manifest declares",
                        manifest.size
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(UploadError::Io)?;
            }
            if size != manifest.size {
                return Err(UploadError::Mismatch(format!(
                    "image is {size} bytes; the manifest declares {}",
                    manifest.size
                )));
            }
            if hex::encode(hasher.finalize()) != manifest.sha256.to_ascii_lowercase() {
                return Err(UploadError::Mismatch(
                    "image SHA-256 does not match the manifest".into(),
                ));
            }
            file.sync_all().await.map_err(UploadError::Io)?;
            tokio::fs::rename(&tmp, self.path(version))
                .await
                .map_err(UploadError::Io)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}
