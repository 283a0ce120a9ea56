//! Where release images live: a local directory by default, or an S3-compatible bucket laid
//! out as seed 003 shows (`{hardware}/releases/v{version}/firmware.bin` + `metadata.json`).
//!
//! An upload is written to a local staging file while its size and SHA-256 are checked
//! against the signed manifest, and only then moved into the store, so a stored image is
//! always the one its manifest names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use flotilla_proto::FirmwareManifest;

/// Size of the body frames a download is served in.
const CHUNK: usize = 64 * 1024;
/// Images kept in memory for serving: a rollout sends one image to many devices, and one
/// shared copy costs far less than a read buffer per download.
const CACHED_IMAGES: usize = 4;

/// How to reach an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// For S3-compatible services (MinIO, moto, ...); AWS when absent.
    pub endpoint: Option<String>,
    pub region: String,
}

#[derive(Debug, Clone)]
enum Backend {
    Local,
    S3(Arc<AmazonS3>),
}

#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Local images, and staging for uploads in either mode.
    dir: PathBuf,
    backend: Backend,
    /// Recently served images, newest last.
    cache: Arc<std::sync::Mutex<Vec<(String, Bytes)>>>,
}

/// Why an upload was refused.
#[derive(Debug)]
pub enum UploadError {
    /// The bytes do not match the manifest.
    Mismatch(String),
    Io(anyhow::Error),
}

pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

impl Artifacts {
    pub fn local(dir: &Path) -> std::io::Result<Artifacts> {
        std::fs::create_dir_all(dir)?;
        Ok(Artifacts {
            dir: dir.to_path_buf(),
            backend: Backend::Local,
            cache: Arc::default(),
        })
    }

    /// An S3 store; credentials come from the standard `AWS_*` environment variables.
    pub fn s3(staging: &Path, s: &S3Settings) -> anyhow::Result<Artifacts> {
        std::fs::create_dir_all(staging)?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&s.bucket)
            .with_region(&s.region);
        if let Some(endpoint) = &s.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        Ok(Artifacts {
            dir: staging.to_path_buf(),
            backend: Backend::S3(Arc::new(b.build()?)),
            cache: Arc::default(),
        })
    }

    /// Local file of a release (versions are validated `MAJOR.MINOR.PATCH`, path-safe).
    fn local_path(&self, version: &str) -> PathBuf {
        self.dir.join(format!("{version}.bin"))
    }

    fn key(hardware: &str, version: &str, file: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{hardware}/releases/v{version}/{file}"))
    }

    /// Streams an upload to staging, checks it against `manifest`, then stores it.
    pub async fn store<S, E>(&self, manifest: &FirmwareManifest, body: S) -> Result<(), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = self.dir.join(format!(
            ".{}.{}.part",
            manifest.version,
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let result = async {
            stage(&tmp, manifest, body).await?;
            match &self.backend {
                Backend::Local => tokio::fs::rename(&tmp, self.local_path(&manifest.version))
                    .await
                    .map_err(|e| UploadError::Io(e.into())),
                Backend::S3(s3) => {
                    let bytes = tokio::fs::read(&tmp)
                        .await
                        .map_err(|e| UploadError::Io(e.into()))?;
                    let image = Self::key(&manifest.hardware, &manifest.version, "firmware.bin");
                    s3.put(&image, PutPayload::from(bytes))
                        .await
                        .map_err(|e| UploadError::Io(e.into()))?;
                    let meta = serde_json::to_vec_pretty(manifest)
                        .map_err(|e| UploadError::Io(e.into()))?;
                    let meta_key =
                        Self::key(&manifest.hardware, &manifest.version, "metadata.json");
                    s3.put(&meta_key, PutPayload::from(meta))
                        .await
                        .map_err(|e| UploadError::Io(e.into()))?;
                    Ok(())
                }
            }
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// `len` bytes of a stored image from `start`, as a stream of chunks that share one
    /// in-memory copy of the image.
    pub async fn range(
        &self,
        hardware: &str,
        version: &str,
        start: u64,
        len: u64,
    ) -> anyhow::Result<ByteStream> {
        let image = self.image(hardware, version).await?;
        let start = usize::try_from(start)?.min(image.len());
        let end = start.saturating_add(usize::try_from(len)?).min(image.len());
        let part = image.slice(start..end);
        let chunks = (0..part.len())
            .step_by(CHUNK)
            .map(move |at| Ok(part.slice(at..(at + CHUNK).min(part.len()))));
        Ok(futures::stream::iter(chunks).boxed())
    }

    /// The whole image, from the cache or the store.
    async fn image(&self, hardware: &str, version: &str) -> anyhow::Result<Bytes> {
        let key = format!("{hardware}/{version}");
        if let Some(bytes) = self.cached(&key) {
            return Ok(bytes);
        }
        let bytes = match &self.backend {
            Backend::Local => Bytes::from(tokio::fs::read(self.local_path(version)).await?),
            Backend::S3(s3) => {
                s3.get(&Self::key(hardware, version, "firmware.bin"))
                    .await?
                    .bytes()
                    .await?
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|(k, _)| *k != key);
        cache.push((key, bytes.clone()));
        if cache.len() > CACHED_IMAGES {
            cache.remove(0);
        }
        Ok(bytes)
    }

    fn cached(&self, key: &str) -> Option<Bytes> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let i = cache.iter().position(|(k, _)| k == key)?;
        let entry = cache.remove(i);
        let bytes = entry.1.clone();
        cache.push(entry);
        Some(bytes)
    }

    /// A time-limited URL anyone can fetch the image from (S3 only).
    pub async fn presigned_url(
        &self,
        hardware: &str,
        version: &str,
        valid_for: Duration,
    ) -> anyhow::Result<Option<String>> {
        match &self.backend {
            Backend::Local => Ok(None),
            Backend::S3(s3) => {
                let url = s3
                    .signed_url(
                        axum::http::Method::GET,
                        &Self::key(hardware, version, "firmware.bin"),
                        valid_for,
                    )
                    .await?;
                Ok(Some(url.to_string()))
            }
        }
    }
}

/// Writes the upload to `tmp`, refusing it as soon as it outgrows the manifest, and checks
/// size and hash at the end, then that it is the app image its manifest names.
async fn stage<S, E>(
    tmp: &Path,
    manifest: &FirmwareManifest,
    mut body: S,
) -> Result<(), UploadError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| UploadError::Io(e.into()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| UploadError::Mismatch(format!("upload broken: {e}")))?;
        size += chunk.len() as u64;
        if size > manifest.size {
            return Err(UploadError::Mismatch(format!(
                "image is larger than the {} bytes the manifest declares",
                manifest.size
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| UploadError::Io(e.into()))?;
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
    file.sync_all()
        .await
        .map_err(|e| UploadError::Io(e.into()))?;
    drop(file);
    // What every device would find after downloading it, found once here.
    let image = tokio::fs::read(tmp)
        .await
        .map_err(|e| UploadError::Io(e.into()))?;
    let manifest = manifest.clone();
    tokio::task::spawn_blocking(move || {
        let read = |at: usize, buf: &mut [u8]| buf.copy_from_slice(&image[at..at + buf.len()]);
        flotilla_device_core::install::check_app_image(&manifest, None, image.len(), read)
    })
    .await
    .map_err(|e| UploadError::Io(e.into()))?
    .map_err(|refused| {
        // The chip is the device's to check; the reason names none.
        let why = match refused {
            flotilla_device_core::ota::OtaRejection::NotAnAppImage => {
                "not an app image a bootloader would boot"
            }
            other => other.reason(),
        };
        UploadError::Mismatch(format!("{why}: a device would refuse it"))
    })
}
