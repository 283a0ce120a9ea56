//! Fetching an image into the inactive slot: streamed in chunks (memory stays bounded by one
//! chunk), resumed with HTTP Range after a dropped link and after a reboot (the flushed offset
//! is persisted), stopped the moment a server sends more than the manifest declares.

use std::time::Duration;

use flotilla_device_core::download::{Download, DownloadPolicy, Step};
use flotilla_device_core::install::{InstallError, SlotWriter};
use flotilla_device_core::slots::OtaSlots;
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

/// What to install, and how the core's policy retries (`seed` draws its jitter).
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub manifest: &'a FirmwareManifest,
    pub start: Start,
    pub policy: DownloadPolicy,
    pub seed: u64,
}

/// Streams the image into the next slot and checks it; on success the slot may be activated.
/// What to fetch, when to retry and when to persist are the core's ([`Download`]); this moves
/// the bytes.
pub(crate) async fn install<S: Source>(
    source: &mut S,
    slots: &mut impl OtaSlots,
    plan: Plan<'_>,
    progress: &mut impl Progress,
) -> Result<(), String> {
    let Plan {
        manifest,
        start,
        policy,
        seed,
    } = plan;
    let describe = |e: InstallError| match e {
        InstallError::Rejected(r) => r.reason().to_string(),
        InstallError::Flash(f) => format!("flash error: {f:?}"),
    };
    let mut writer = match start {
        Start::Resume(offset) if offset > 0 => {
            let (w, from) = SlotWriter::resume(slots, manifest, offset).map_err(describe)?;
            tracing::info!(from, "resuming download after reboot");
            w
        }
        _ => SlotWriter::begin(slots, manifest).map_err(describe)?,
    };
    progress.flushed(writer.flushed()).await;
    let clock = Clock(tokio::time::Instant::now());
    let mut download = Download::new(policy, manifest.size, writer.received(), seed, clock.now());
    loop {
        match download.next(clock.now()) {
            Step::Fetch { from } => {
                match fetch_into(
                    source,
                    slots,
                    &mut writer,
                    &mut download,
                    progress,
                    from,
                    &clock,
                )
                .await
                {
                    Ok(()) => download.handle_end(clock.now()),
                    Err(Stop::Install(e)) => download.handle_fatal(describe(e)),
                    Err(Stop::Fetch(FetchError::Fatal(why))) => download.handle_fatal(why),
                    Err(Stop::Fetch(FetchError::Retry(why))) => {
                        tracing::warn!(error = %why, at = download.received(), "download interrupted");
                        download.handle_failure(clock.now());
                    }
                }
            }
            Step::Wait { until_ms } => tokio::time::sleep_until(clock.at(until_ms)).await,
            Step::Done => break,
            Step::Failed(why) => return Err(why),
            // fetch_into reads a response to its end before the loop asks again.
            Step::Read { .. } => unreachable!("no response is open"),
        }
    }
    writer.finish(slots).map_err(describe)
}

/// The core's milliseconds on tokio's clock (paused in tests).
struct Clock(tokio::time::Instant);

impl Clock {
    fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> tokio::time::Instant {
        self.0 + Duration::from_millis(ms)
    }
}

enum Stop {
    Install(InstallError),
    Fetch(FetchError),
}

/// One response's worth of bytes, each chunk given until the core's read deadline.
async fn fetch_into<S: Source>(
    source: &mut S,
    slots: &mut impl OtaSlots,
    writer: &mut SlotWriter,
    download: &mut Download,
    progress: &mut impl Progress,
    from: u64,
    clock: &Clock,
) -> Result<(), Stop> {
    let silent = || {
        Stop::Fetch(FetchError::Retry(
            "the server sent nothing for too long".into(),
        ))
    };
    let deadline = clock.at(download.read_deadline());
    let mut body = tokio::time::timeout_at(deadline, source.open(from))
        .await
        .map_err(|_| silent())?
        .map_err(Stop::Fetch)?;
    loop {
        let deadline = clock.at(download.read_deadline());
        let Some(chunk) = tokio::time::timeout_at(deadline, body.next())
            .await
            .map_err(|_| silent())?
            .map_err(Stop::Fetch)?
        else {
            return Ok(());
        };
        // Refuses the chunk whole once the image would outgrow its declared size, so a server
        // that streams forever is cut off there.
        writer.write(slots, &chunk).map_err(Stop::Install)?;
        progress.received(writer.received());
        if let Some(offset) =
            download.handle_progress(writer.received(), writer.flushed(), clock.now())
        {
            progress.flushed(offset).await;
        }
    }
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
    use flotilla_device_core::otadata::{Layout, OtaData};
    use flotilla_device_core::slots::{Flash, FlashError};
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
        /// The first response goes silent after its bytes instead of ending.
        stall_first: bool,
    }

    struct FlakyBody {
        data: Vec<u8>,
        at: usize,
        forever: bool,
        stall: bool,
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
                stall: std::mem::take(&mut self.stall_first),
            })
        }
    }

    impl Body for FlakyBody {
        async fn next(&mut self) -> Result<Option<bytes::Bytes>, FetchError> {
            if self.at >= self.data.len() {
                if self.stall {
                    std::future::pending::<()>().await;
                }
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

    /// An app image of about `len` bytes, signed for esp32c3 2.0.0, and a chip to put it on.
    fn setup(len: usize) -> (Vec<u8>, FirmwareManifest, Layout, Ram) {
        let header = crate::image::ImageHeader {
            version: "2.0.0".into(),
            hardware: "esp32c3".into(),
            security_counter: 0,
            behaviour: Default::default(),
        };
        setup_with(crate::image::build(&header, len).unwrap())
    }

    fn setup_with(image: Vec<u8>) -> (Vec<u8>, FirmwareManifest, Layout, Ram) {
        let len = image.len();
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

    fn plan(manifest: &FirmwareManifest, start: Start, policy: DownloadPolicy) -> Plan<'_> {
        Plan {
            manifest,
            start,
            policy,
            seed: 1,
        }
    }

    /// The policy the agent runs, on tokio's paused clock: its waits take no real time.
    const RETRY: DownloadPolicy = DownloadPolicy {
        attempts_without_progress: 8,
        give_up_after_ms: 120_000,
        backoff: flotilla_device_core::BackoffConfig {
            base_ms: 500,
            cap_ms: 30_000,
            stable_ms: 0,
        },
        stall_ms: 30_000,
        persist_every: 64 * 1024,
    };

    #[tokio::test(start_paused = true)]
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
                stall_first: false,
            };
            let mut watch = Watch::default();
            install(
                &mut source,
                &mut OtaData::new(layout, &mut flash),
                plan(&manifest, Start::Fresh, RETRY),
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

    #[tokio::test(start_paused = true)]
    async fn a_server_that_streams_forever_is_stopped_at_the_declared_size() {
        let (image, manifest, layout, mut flash) = setup(100_000);
        let mut source = Flaky {
            image,
            cuts: vec![],
            forever: true,
            opened_at: vec![],
            stall_first: false,
        };
        let mut watch = Watch::default();
        let result = install(
            &mut source,
            &mut OtaData::new(layout, &mut flash),
            plan(&manifest, Start::Fresh, RETRY),
            &mut watch,
        )
        .await;
        assert_eq!(result.unwrap_err(), "image larger than declared");
        assert!(watch.received <= 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_download_resumes_after_a_reboot_from_the_persisted_offset() {
        let (image, manifest, layout, mut flash) = setup(400_000);
        // First boot: the link drops for good after ~200 KB.
        let mut source = Flaky {
            image: image.clone(),
            cuts: vec![200_000, 0, 0],
            forever: false,
            opened_at: vec![],
            stall_first: false,
        };
        let mut watch = Watch::default();
        // An attempt that brings nothing ends it.
        let retry = DownloadPolicy {
            attempts_without_progress: 1,
            give_up_after_ms: 0,
            ..RETRY
        };
        let failed = install(
            &mut source,
            &mut OtaData::new(layout, &mut flash),
            plan(&manifest, Start::Fresh, retry),
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
            stall_first: false,
        };
        install(
            &mut source,
            &mut OtaData::new(layout, &mut flash),
            plan(&manifest, Start::Resume(persisted), RETRY),
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

    #[tokio::test(start_paused = true)]
    async fn a_server_that_goes_silent_mid_image_is_left_after_the_stall_time_and_resumed() {
        let (image, manifest, layout, mut flash) = setup(200_000);
        let mut source = Flaky {
            image: image.clone(),
            cuts: vec![70_000],
            forever: false,
            opened_at: vec![],
            stall_first: true,
        };
        let started = tokio::time::Instant::now();
        install(
            &mut source,
            &mut OtaData::new(layout, &mut flash),
            plan(&manifest, Start::Fresh, RETRY),
            &mut Watch::default(),
        )
        .await
        .unwrap();
        // Left after the core's stall time (on the paused clock), asked again from the byte
        // after the last one received, within one backoff base.
        let waited = started.elapsed().as_millis() as u64;
        assert!(
            (RETRY.stall_ms..=RETRY.stall_ms + RETRY.backoff.base_ms).contains(&waited),
            "{waited} ms"
        );
        assert_eq!(source.opened_at, vec![0, 70_000]);
        assert_eq!(
            &flash.0[layout.slots[1]..layout.slots[1] + image.len()],
            &image[..]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_from_another_release_fails_its_hash_check() {
        let (mut image, manifest, layout, mut flash) = setup(50_000);
        let last = image.len() - 1;
        image[last] ^= 0xFF;
        assert_eq!(
            install_uncut(image, &manifest, layout, &mut flash)
                .await
                .unwrap_err(),
            "image SHA-256 does not match the manifest"
        );
    }

    /// `image` served without a cut, installed from the start.
    async fn install_uncut(
        image: Vec<u8>,
        manifest: &FirmwareManifest,
        layout: Layout,
        flash: &mut Ram,
    ) -> Result<(), String> {
        let mut source = Flaky {
            image,
            cuts: vec![],
            forever: false,
            opened_at: vec![],
            stall_first: false,
        };
        install(
            &mut source,
            &mut OtaData::new(layout, flash),
            plan(manifest, Start::Fresh, RETRY),
            &mut Watch::default(),
        )
        .await
    }

    /// Bytes the release key signed are installed only if the bootloader would boot them, and
    /// only if they are what their manifest says: either mistake would reboot the chip into
    /// nothing, or into another identity.
    #[tokio::test(start_paused = true)]
    async fn a_signed_file_that_is_not_the_image_its_manifest_names_is_refused_before_activation() {
        let header = |hardware: &str, counter| crate::image::ImageHeader {
            version: "2.0.0".into(),
            hardware: hardware.into(),
            security_counter: counter,
            behaviour: Default::default(),
        };
        let good = crate::image::build(&header("esp32c3", 0), 40_000).unwrap();
        let mut broken = good.clone();
        broken[100] ^= 0xFF;
        for (image, why) in [
            (
                vec![0xA5u8; 40_000],
                "not an ESP32-C3 app image the bootloader would boot",
            ),
            (
                broken,
                "not an ESP32-C3 app image the bootloader would boot",
            ),
            (
                crate::image::build(&header("devkit-c3", 0), 40_000).unwrap(),
                "app descriptor disagrees with the manifest",
            ),
            (
                crate::image::build(&header("esp32c3", 1), 40_000).unwrap(),
                "app descriptor disagrees with the manifest",
            ),
            (
                crate::image::build(
                    &crate::image::ImageHeader {
                        version: "2.0.1".into(),
                        ..header("esp32c3", 0)
                    },
                    40_000,
                )
                .unwrap(),
                "app descriptor disagrees with the manifest",
            ),
        ] {
            // The manifest is the one for esp32c3 2.0.0 with counter 0, over these bytes.
            let (image, manifest, layout, mut flash) = setup_with(image);
            let result = install_uncut(image, &manifest, layout, &mut flash).await;
            assert_eq!(result.unwrap_err(), why);
            // The refused image cannot be booted by any fallback either.
            assert!(crate::image::read(&flash, &layout, 1).is_none());
        }
    }

    /// A file with bytes after the image (its size not a multiple of the write unit): the tail
    /// is written padded, and the image verifies.
    #[tokio::test(start_paused = true)]
    async fn an_image_followed_by_a_few_bytes_is_installed_whole() {
        let (mut image, ..) = setup(40_000);
        image.extend_from_slice(&[1, 2, 3]);
        let (image, manifest, layout, mut flash) = setup_with(image);
        install_uncut(image.clone(), &manifest, layout, &mut flash)
            .await
            .unwrap();
        let at = layout.slots[1];
        assert_eq!(&flash.0[at..at + image.len()], &image[..]);
        assert_eq!(flash.0[at + image.len()], 0xFF, "padding");
    }
}
