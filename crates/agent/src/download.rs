//! Fetching an image into the inactive slot: streamed in chunks (memory stays bounded by one
//! chunk), resumed with HTTP Range after a dropped link and after a reboot (the flushed offset
//! is persisted), stopped the moment a server sends more than the manifest declares.

use std::time::Duration;

use flotilla_device_core::install::{InstallError, SlotWriter};
use flotilla_device_core::slots::{Flash, Layout};
use flotilla_proto::FirmwareManifest;

/// Why one attempt to fetch bytes failed.
#[derive(Debug)]
pub enum FetchError {
    /// Worth another attempt (link dropped, server busy).
    Retry(String),
    /// Another attempt would fail the same way (refused, not found).
    Fatal(String),
}

/// Where image bytes come from: HTTPS in the agent, memory in tests.
pub(crate) trait Source {
    type Body: Body;
    /// Opens the image at byte `from`.
    async fn open(&mut self, from: u64) -> Result<Self::Body, FetchError>;
}

pub(crate) trait Body {
    /// The next chunk, `None` at the end of the response.
    async fn next(&mut self) -> Result<Option<bytes::Bytes>, FetchError>;
}

/// How often to try again after a dropped link, and how long to wait in between.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub delay: Duration,
}

/// Where to start: a fresh slot, or the offset persisted by an earlier attempt.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    Fresh,
    Resume(u64),
}

/// The device's side effects during a download, so tests can watch them.
pub(crate) trait Progress {
    /// Bytes up to `offset` are written; make them durable and persist the offset for a
    /// resume after a reboot.
    fn flushed(&mut self, offset: u64) -> impl Future<Output = ()> + Send;
    /// Bytes accepted so far, for progress reports.
    fn received(&mut self, received: u64);
}

/// Persist the resume offset about this often (each write is an fsync'd NVS update).
const PERSIST_EVERY: u64 = 64 * 1024;

/// What to install where.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub layout: &'a Layout,
    pub slot: usize,
    pub manifest: &'a FirmwareManifest,
    pub start: Start,
    pub retry: Retry,
}

/// Streams the image into the plan's slot and checks it; on success the slot may be activated.
pub(crate) async fn install<S: Source, F: Flash>(
    source: &mut S,
    flash: &mut F,
    plan: Plan<'_>,
    progress: &mut impl Progress,
) -> Result<(), String> {
    let Plan {
        layout,
        slot,
        manifest,
        start,
        retry,
    } = plan;
    let describe = |e: InstallError| match e {
        InstallError::Rejected(r) => r.reason().to_string(),
        InstallError::Flash(f) => format!("flash error: {f:?}"),
    };
    let mut writer = match start {
        Start::Resume(offset) if offset > 0 => {
            let (w, from) =
                SlotWriter::resume(layout, flash, slot, manifest, offset).map_err(describe)?;
            tracing::info!(from, "resuming download after reboot");
            w
        }
        _ => SlotWriter::begin(layout, flash, slot, manifest).map_err(describe)?,
    };
    progress.flushed(writer.flushed()).await;
    let mut persisted = writer.flushed();
    let mut failures = 0;
    while writer.received() < manifest.size {
        let attempt = fetch_into(source, flash, &mut writer, progress, &mut persisted).await;
        match attempt {
            Ok(()) if writer.received() >= manifest.size => break,
            // The response ended early: the link or the server cut it.
            Ok(()) => failures += 1,
            Err(Stop::Install(e)) => return Err(describe(e)),
            Err(Stop::Fetch(FetchError::Fatal(why))) => return Err(why),
            Err(Stop::Fetch(FetchError::Retry(why))) => {
                tracing::warn!(error = %why, at = writer.received(), "download interrupted");
                failures += 1;
            }
        }
        if failures > retry.attempts {
            return Err(format!("download failed after {} attempts", retry.attempts));
        }
        tokio::time::sleep(retry.delay).await;
    }
    writer.finish(flash).map_err(describe)
}

enum Stop {
    Install(InstallError),
    Fetch(FetchError),
}

/// One response's worth of bytes.
async fn fetch_into<S: Source, F: Flash>(
    source: &mut S,
    flash: &mut F,
    writer: &mut SlotWriter,
    progress: &mut impl Progress,
    persisted: &mut u64,
) -> Result<(), Stop> {
    let mut body = source.open(writer.received()).await.map_err(Stop::Fetch)?;
    while let Some(chunk) = body.next().await.map_err(Stop::Fetch)? {
        // Refuses the chunk whole once the image would outgrow its declared size, so a server
        // that streams forever is cut off there.
        writer.write(flash, &chunk).map_err(Stop::Install)?;
        progress.received(writer.received());
        if writer.flushed() >= *persisted + PERSIST_EVERY {
            *persisted = writer.flushed();
            progress.flushed(*persisted).await;
        }
    }
    Ok(())
}

/// The image over HTTPS from the device listener, authenticated by the device certificate.
pub struct Https {
    pub client: reqwest::Client,
    pub url: String,
}

impl Source for Https {
    type Body = reqwest::Response;

    async fn open(&mut self, from: u64) -> Result<reqwest::Response, FetchError> {
        let response = self
            .client
            .get(&self.url)
            .header(reqwest::header::RANGE, format!("bytes={from}-"))
            .send()
            .await
            .map_err(|e| FetchError::Retry(e.to_string()))?;
        let status = response.status();
        match status.as_u16() {
            206 => {
                let starts_at = response
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if starts_at != Some(from) {
                    return Err(FetchError::Fatal(
                        "server answered a different range".into(),
                    ));
                }
                Ok(response)
            }
            200 if from == 0 => Ok(response),
            200 => Err(FetchError::Fatal("server ignored the Range request".into())),
            429 | 500..=599 => Err(FetchError::Retry(format!("server answered {status}"))),
            _ => Err(FetchError::Fatal(format!(
                "server refused the download: {status}"
            ))),
        }
    }
}

impl Body for reqwest::Response {
    async fn next(&mut self) -> Result<Option<bytes::Bytes>, FetchError> {
        self.chunk()
            .await
            .map_err(|e| FetchError::Retry(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use flotilla_device_core::ota::to_hex;
    use flotilla_device_core::slots::FlashError;
    use sha2::{Digest, Sha256};

    struct Ram(Vec<u8>);

    impl Flash for Ram {
        const ERASE_BLOCK: usize = 4096;
        const WRITE_ALIGN: usize = 4;
        fn read(&self, offset: usize, buf: &mut [u8]) {
            buf.copy_from_slice(&self.0[offset..offset + buf.len()]);
        }
        fn erase(&mut self, offset: usize) -> Result<(), FlashError> {
            self.0[offset..offset + 4096].fill(0xFF);
            Ok(())
        }
        fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), FlashError> {
            if self.0[offset..offset + data.len()]
                .iter()
                .any(|b| *b != 0xFF)
            {
                return Err(FlashError::NotErased);
            }
            self.0[offset..offset + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    /// Serves `image` from any offset, cutting each response after `cut` bytes, or (with
    /// `forever`) appending garbage without end.
    struct Flaky {
        image: Vec<u8>,
        cuts: Vec<usize>,
        forever: bool,
        opened_at: Vec<u64>,
    }

    struct FlakyBody {
        data: Vec<u8>,
        at: usize,
        forever: bool,
    }

    impl Source for Flaky {
        type Body = FlakyBody;
        async fn open(&mut self, from: u64) -> Result<FlakyBody, FetchError> {
            self.opened_at.push(from);
            let rest = &self.image[from as usize..];
            let cut = if self.cuts.is_empty() {
                rest.len()
            } else {
                self.cuts.remove(0).min(rest.len())
            };
            Ok(FlakyBody {
                data: rest[..cut].to_vec(),
                at: 0,
                forever: self.forever,
            })
        }
    }

    impl Body for FlakyBody {
        async fn next(&mut self) -> Result<Option<bytes::Bytes>, FetchError> {
            if self.at >= self.data.len() {
                return Ok(self.forever.then(|| bytes::Bytes::from(vec![0x5A; 1000])));
            }
            let end = (self.at + 1500).min(self.data.len());
            let chunk = bytes::Bytes::copy_from_slice(&self.data[self.at..end]);
            self.at = end;
            Ok(Some(chunk))
        }
    }

    #[derive(Default)]
    struct Watch {
        flushed: Vec<u64>,
        received: u64,
    }

    impl Progress for Watch {
        async fn flushed(&mut self, offset: u64) {
            self.flushed.push(offset);
        }
        fn received(&mut self, received: u64) {
            self.received = received;
        }
    }

    const SLOT: usize = 512 * 1024;

    fn setup(len: usize) -> (Vec<u8>, FirmwareManifest, Layout, Ram) {
        let image: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let manifest = FirmwareManifest {
            version: "2.0.0".into(),
            hardware: "esp32c3".into(),
            size: len as u64,
            sha256: to_hex(&Sha256::digest(&image)),
            security_counter: 0,
            issued_at: 0,
            expires_at: None,
        };
        let layout = Layout {
            otadata: 0,
            slots: [8192, 8192 + SLOT],
            slot_len: SLOT,
        };
        (image, manifest, layout, Ram(vec![0; 8192 + 2 * SLOT]))
    }

    fn plan<'a>(
        layout: &'a Layout,
        manifest: &'a FirmwareManifest,
        start: Start,
        retry: Retry,
    ) -> Plan<'a> {
        Plan {
            layout,
            slot: 1,
            manifest,
            start,
            retry,
        }
    }

    const RETRY: Retry = Retry {
        attempts: 50,
        delay: Duration::from_millis(0),
    };

    #[tokio::test]
    async fn a_download_cut_at_random_offsets_resumes_with_range_and_completes() {
        for seed in 0..20u64 {
            let (image, manifest, layout, mut flash) = setup(300_001);
            let mut rng = flotilla_device_core::Rng::new(seed + 1);
            let cuts = (0..8)
                .map(|_| 1 + (rng.next_u64() % 30_000) as usize)
                .collect();
            let mut source = Flaky {
                image: image.clone(),
                cuts,
                forever: false,
                opened_at: vec![],
            };
            let mut watch = Watch::default();
            install(
                &mut source,
                &mut flash,
                plan(&layout, &manifest, Start::Fresh, RETRY),
                &mut watch,
            )
            .await
            .unwrap();
            assert_eq!(
                &flash.0[layout.slots[1]..layout.slots[1] + image.len()],
                &image[..]
            );
            // Every reconnect asked for the byte after the last one received.
            assert_eq!(source.opened_at.len(), 9, "seed {seed}");
            assert!(source.opened_at.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(watch.received, image.len() as u64);
        }
    }

    #[tokio::test]
    async fn a_server_that_streams_forever_is_stopped_at_the_declared_size() {
        let (image, manifest, layout, mut flash) = setup(100_000);
        let mut source = Flaky {
            image,
            cuts: vec![],
            forever: true,
            opened_at: vec![],
        };
        let mut watch = Watch::default();
        let result = install(
            &mut source,
            &mut flash,
            plan(&layout, &manifest, Start::Fresh, RETRY),
            &mut watch,
        )
        .await;
        assert_eq!(result.unwrap_err(), "image larger than declared");
        assert!(watch.received <= 100_000);
    }

    #[tokio::test]
    async fn a_download_resumes_after_a_reboot_from_the_persisted_offset() {
        let (image, manifest, layout, mut flash) = setup(400_000);
        // First boot: the link drops for good after ~200 KB.
        let mut source = Flaky {
            image: image.clone(),
            cuts: vec![200_000, 0, 0],
            forever: false,
            opened_at: vec![],
        };
        let mut watch = Watch::default();
        let retry = Retry {
            attempts: 2,
            delay: Duration::from_millis(0),
        };
        let failed = install(
            &mut source,
            &mut flash,
            plan(&layout, &manifest, Start::Fresh, retry),
            &mut watch,
        )
        .await;
        assert!(failed.is_err());
        let persisted = *watch.flushed.last().unwrap();
        assert!(persisted >= 128 * 1024, "persisted {persisted}");
        // After the reboot: resume from the persisted offset (rounded to an erase block).
        let mut source = Flaky {
            image: image.clone(),
            cuts: vec![],
            forever: false,
            opened_at: vec![],
        };
        install(
            &mut source,
            &mut flash,
            plan(&layout, &manifest, Start::Resume(persisted), RETRY),
            &mut Watch::default(),
        )
        .await
        .unwrap();
        assert_eq!(source.opened_at, vec![persisted - persisted % 4096]);
        assert_eq!(
            &flash.0[layout.slots[1]..layout.slots[1] + image.len()],
            &image[..]
        );
    }

    #[tokio::test]
    async fn an_image_from_another_release_fails_its_hash_check() {
        let (mut image, manifest, layout, mut flash) = setup(50_000);
        image[49_999] ^= 0xFF;
        let mut source = Flaky {
            image,
            cuts: vec![],
            forever: false,
            opened_at: vec![],
        };
        let result = install(
            &mut source,
            &mut flash,
            plan(&layout, &manifest, Start::Fresh, RETRY),
            &mut Watch::default(),
        )
        .await;
        assert_eq!(
            result.unwrap_err(),
            "image SHA-256 does not match the manifest"
        );
    }
}
