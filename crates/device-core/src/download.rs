//! The download policy of an update: which byte to ask for, how long to wait after a failure,
//! how long a silent server is given, when the resume offset is persisted, and when to give
//! up. The shell only moves bytes: it opens the request a [`Step::Fetch`] names (HTTP `Range`
//! from that byte), writes each chunk with [`crate::install::SlotWriter`], reports the writer's
//! counts with [`Download::handle_progress`], and says how the response ended
//! ([`Download::handle_end`], [`Download::handle_failure`]). Times are the shell's monotonic
//! milliseconds, so tests step a clock instead of sleeping.
//!
//! Retries back off exponentially with full jitter, capped, so a fleet that lost the server at
//! one instant does not return to it at one instant; bytes received reset the backoff, so a
//! link that keeps dropping still finishes a large image, and only failures in a row that
//! brought nothing count towards giving up.

use alloc::string::String;

use crate::backoff::{Backoff, BackoffConfig};
use crate::rng::Rng;

/// How a download retries, waits and persists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadPolicy {
    /// Failed attempts in a row that received nothing, after which the download fails, once
    /// [`DownloadPolicy::give_up_after_ms`] passed without a byte as well.
    pub attempts_without_progress: u32,
    /// The least time without a byte before the download fails: full jitter may draw short
    /// waits, and a server restart should not fail the downloads it interrupted.
    pub give_up_after_ms: u64,
    /// The wait before each new attempt (full jitter, capped); reset by received bytes.
    pub backoff: BackoffConfig,
    /// A response that delivers no byte for this long is abandoned and tried again.
    pub stall_ms: u64,
    /// Persist the resume offset each time this many more bytes are on flash (each persist
    /// is an NVS write: flash wear against bytes fetched again after a reboot).
    pub persist_every: u64,
}

impl Default for DownloadPolicy {
    fn default() -> Self {
        DownloadPolicy {
            attempts_without_progress: 8,
            give_up_after_ms: 120_000,
            backoff: BackoffConfig {
                base_ms: 500,
                cap_ms: 30_000,
                stable_ms: 0,
            },
            stall_ms: 30_000,
            persist_every: 64 * 1024,
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Open the image from byte `from` (`Range: bytes=from-`) and read it, giving each chunk
    /// until [`Download::read_deadline`].
    Fetch { from: u64 },
    /// Read on: the response [`Step::Fetch`] opened is still being received.
    Read { deadline_ms: u64 },
    /// Nothing until `until_ms`, then ask again.
    Wait { until_ms: u64 },
    /// Every byte is received: finish the image.
    Done,
    /// Stop: the download failed, for the reason given.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// The next attempt may start at this time.
    Idle {
        ready_at: u64,
    },
    /// A response is open; `last_byte_at` is when it last delivered (or opened).
    Fetching {
        last_byte_at: u64,
        progressed: bool,
    },
    Done,
    Failed(String),
}

/// One update's download, from a fresh slot or a resumed offset.
#[derive(Debug, Clone)]
pub struct Download {
    policy: DownloadPolicy,
    size: u64,
    received: u64,
    persisted: u64,
    failures: u32,
    /// When the last byte came (or the download began).
    progress_at: u64,
    backoff: Backoff,
    rng: Rng,
    phase: Phase,
}

impl Download {
    /// A download of an image of `size` bytes of which `received` are on flash already (0, or
    /// the offset a resume after a reboot starts from), at time `now_ms`. `seed` draws the
    /// jitter: give each device its own.
    pub fn new(policy: DownloadPolicy, size: u64, received: u64, seed: u64, now_ms: u64) -> Self {
        Download {
            policy,
            size,
            received,
            persisted: received,
            failures: 0,
            progress_at: now_ms,
            backoff: Backoff::new(policy.backoff),
            rng: Rng::new(seed),
            phase: if received >= size {
                Phase::Done
            } else {
                Phase::Idle { ready_at: now_ms }
            },
        }
    }

    /// What to do at `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> Step {
        match &self.phase {
            Phase::Idle { ready_at } if now_ms < *ready_at => Step::Wait {
                until_ms: *ready_at,
            },
            Phase::Idle { .. } => {
                self.phase = Phase::Fetching {
                    last_byte_at: now_ms,
                    progressed: false,
                };
                Step::Fetch {
                    from: self.received,
                }
            }
            Phase::Fetching { .. } => Step::Read {
                deadline_ms: self.read_deadline(),
            },
            Phase::Done => Step::Done,
            Phase::Failed(why) => Step::Failed(why.clone()),
        }
    }

    /// Until when the open response may stay silent before the shell gives up on it with
    /// [`Download::handle_failure`].
    pub fn read_deadline(&self) -> u64 {
        match self.phase {
            Phase::Fetching { last_byte_at, .. } => {
                last_byte_at.saturating_add(self.policy.stall_ms)
            }
            _ => u64::MAX,
        }
    }

    /// A chunk was written: `received` bytes are accepted in all, `flushed` of them are on
    /// flash. Returns the offset to persist now for a resume after a reboot, if one is due.
    pub fn handle_progress(&mut self, received: u64, flushed: u64, now_ms: u64) -> Option<u64> {
        if let Phase::Fetching {
            last_byte_at,
            progressed,
        } = &mut self.phase
        {
            *last_byte_at = now_ms;
            if received > self.received {
                *progressed = true;
                self.progress_at = now_ms;
            }
        }
        self.received = self.received.max(received);
        if flushed >= self.persisted.saturating_add(self.policy.persist_every) {
            self.persisted = flushed;
            Some(flushed)
        } else {
            None
        }
    }

    /// The response ended. Complete when every byte came; otherwise the link or the server cut
    /// it, and it counts as a failed attempt.
    pub fn handle_end(&mut self, now_ms: u64) {
        if !matches!(self.phase, Phase::Fetching { .. }) {
            return;
        }
        if self.received >= self.size {
            self.phase = Phase::Done;
        } else {
            self.handle_failure(now_ms);
        }
    }

    /// The open attempt failed in a way another may not (refused connection, 5xx, dropped
    /// link, silence past [`Download::read_deadline`]). Ignored when no attempt is open.
    pub fn handle_failure(&mut self, now_ms: u64) {
        if !matches!(self.phase, Phase::Fetching { .. }) {
            return;
        }
        // Cut after the last byte, before the response ended: nothing is missing (asking
        // for the bytes after the end would be refused).
        if self.received >= self.size {
            self.phase = Phase::Done;
            return;
        }
        let progressed = matches!(
            self.phase,
            Phase::Fetching {
                progressed: true,
                ..
            }
        );
        if progressed {
            self.backoff.reset();
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
        }
        if self.failures >= self.policy.attempts_without_progress
            && now_ms.saturating_sub(self.progress_at) >= self.policy.give_up_after_ms
        {
            self.phase = Phase::Failed(alloc::format!(
                "download failed: {} attempts in a row received nothing",
                self.failures
            ));
            return;
        }
        let wait = self.backoff.next_delay_ms(&mut self.rng);
        self.phase = Phase::Idle {
            ready_at: now_ms.saturating_add(wait),
        };
    }

    /// The download cannot succeed (the server refused the device, the image outgrew its
    /// declared size, flash failed): stop with `why`.
    pub fn handle_fatal(&mut self, why: String) {
        if self.phase != Phase::Done {
            self.phase = Phase::Failed(why);
        }
    }

    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    const SIZE: u64 = 1_000_000;

    fn fetch(d: &mut Download, now: u64) -> u64 {
        match d.next(now) {
            Step::Fetch { from } => from,
            other => panic!("expected a fetch at {now}, got {other:?}"),
        }
    }

    /// When the download may fetch again, after a failure (full jitter may draw no wait).
    fn ready_at(d: &Download) -> u64 {
        match d.phase {
            Phase::Idle { ready_at } => ready_at,
            ref other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn a_link_cut_again_and_again_resumes_from_the_next_byte_and_finishes() {
        let policy = DownloadPolicy::default();
        let mut d = Download::new(policy, SIZE, 0, 7, 0);
        let mut now = 0;
        let mut opened = Vec::new();
        // Cut every 30,000 bytes, 34 times: far more cuts than attempts without progress.
        loop {
            opened.push(fetch(&mut d, now));
            let until = (d.received() + 30_000).min(SIZE);
            while d.received() < until {
                now += 10;
                let received = d.received() + 1_000;
                d.handle_progress(received, received, now);
            }
            d.handle_end(now);
            match d.phase {
                Phase::Done => break,
                Phase::Idle { ready_at } => {
                    // Bytes came, so the backoff starts over: at most its base.
                    assert!(ready_at - now <= policy.backoff.base_ms);
                    now = ready_at;
                }
                ref other => panic!("{other:?}"),
            }
        }
        assert_eq!(opened.len(), 34);
        assert!(opened.windows(2).all(|w| w[1] == w[0] + 30_000));
        assert_eq!(d.next(now), Step::Done);
    }

    #[test]
    fn a_server_that_refuses_every_attempt_is_retried_with_capped_growing_waits_then_given_up() {
        let policy = DownloadPolicy::default();
        let mut d = Download::new(policy, SIZE, 0, 1, 0);
        let mut now = 0;
        let mut waits = Vec::new();
        loop {
            match d.next(now) {
                Step::Fetch { from } => assert_eq!(from, 0),
                Step::Failed(why) => {
                    assert!(why.contains("received nothing"), "{why}");
                    break;
                }
                other => panic!("{other:?}"),
            }
            d.handle_failure(now);
            if let Phase::Idle { ready_at } = d.phase {
                waits.push(ready_at - now);
                now = ready_at;
            }
        }
        // At least the attempts, and at least the time without a byte.
        assert!(waits.len() as u32 >= policy.attempts_without_progress - 1);
        assert!(now >= policy.give_up_after_ms, "gave up after {now} ms");
        for (n, wait) in waits.iter().enumerate() {
            let ceiling = (policy.backoff.base_ms << n.min(32)).min(policy.backoff.cap_ms);
            assert!(*wait <= ceiling, "wait {n}: {wait} > {ceiling}");
        }
    }

    #[test]
    fn the_waits_grow_towards_the_cap() {
        let policy = DownloadPolicy::default();
        // The mean over many devices of the n-th wait: about half its ceiling.
        let mut sums = [0u64; 8];
        for seed in 1..=200 {
            let mut d = Download::new(policy, SIZE, 0, seed, 0);
            let mut now = 0;
            for sum in &mut sums {
                fetch(&mut d, now);
                d.handle_failure(now);
                let at = ready_at(&d);
                *sum += at - now;
                now = at;
            }
        }
        let means: Vec<u64> = sums.iter().map(|s| s / 200).collect();
        assert!(means[0] < policy.backoff.base_ms, "{means:?}");
        assert!(means[4] > 4 * means[0], "{means:?}");
        assert!(means[7] > policy.backoff.cap_ms / 4, "{means:?}");
    }

    #[test]
    fn a_link_cut_after_the_last_byte_completes_the_download() {
        let mut d = Download::new(DownloadPolicy::default(), SIZE, 0, 4, 0);
        fetch(&mut d, 0);
        d.handle_progress(SIZE, SIZE, 10);
        d.handle_failure(20);
        assert_eq!(d.next(20), Step::Done);
    }

    #[test]
    fn a_server_that_goes_silent_is_given_the_stall_time_from_its_last_byte() {
        let policy = DownloadPolicy::default();
        let mut d = Download::new(policy, SIZE, 0, 3, 0);
        fetch(&mut d, 0);
        assert_eq!(d.read_deadline(), policy.stall_ms);
        d.handle_progress(500, 0, 12_000);
        // Each byte moves the deadline on.
        assert_eq!(
            d.next(20_000),
            Step::Read {
                deadline_ms: 12_000 + policy.stall_ms
            }
        );
        // Then nothing: the shell's read gives up at the deadline, and the next attempt
        // starts from the byte after the last one received.
        d.handle_failure(12_000 + policy.stall_ms);
        let at = ready_at(&d);
        assert_eq!(fetch(&mut d, at), 500);
    }

    #[test]
    fn the_resume_offset_is_persisted_every_interval_of_flushed_bytes_and_a_resume_starts_there() {
        let policy = DownloadPolicy::default();
        let mut d = Download::new(policy, SIZE, 0, 5, 0);
        fetch(&mut d, 0);
        let mut persisted = Vec::new();
        for k in 1..=300u64 {
            // Flash is written in 4 KiB sectors: flushed lags received.
            let received = k * 3_000;
            let flushed = received / 4096 * 4096;
            persisted.extend(d.handle_progress(received, flushed, k));
        }
        assert!(!persisted.is_empty());
        assert!(
            persisted
                .windows(2)
                .all(|w| w[1] >= w[0] + policy.persist_every)
        );
        assert!(persisted.iter().all(|p| p % 4096 == 0));
        // After a reboot, from the last persisted offset.
        let from = *persisted.last().unwrap();
        let mut resumed = Download::new(policy, SIZE, from, 5, 0);
        assert_eq!(fetch(&mut resumed, 0), from);
    }

    #[test]
    fn a_fleet_that_failed_at_once_does_not_retry_at_once() {
        let policy = DownloadPolicy::default();
        let mut firsts = Vec::new();
        for seed in 1..=100 {
            let mut d = Download::new(policy, SIZE, 0, seed, 0);
            fetch(&mut d, 0);
            d.handle_failure(0);
            d.handle_failure(0); // ignored: no attempt is open
            firsts.push(ready_at(&d));
        }
        firsts.sort_unstable();
        firsts.dedup();
        // Spread over [0, base], not one instant.
        assert!(firsts.len() > 80, "{} distinct retry times", firsts.len());
        assert!(*firsts.last().unwrap() <= policy.backoff.base_ms);
    }

    #[test]
    fn a_fatal_error_stops_the_download_and_a_complete_one_stays_done() {
        let mut d = Download::new(DownloadPolicy::default(), SIZE, 0, 9, 0);
        fetch(&mut d, 0);
        d.handle_fatal("image larger than declared".into());
        assert_eq!(d.next(1), Step::Failed("image larger than declared".into()));
        let mut d = Download::new(DownloadPolicy::default(), SIZE, 0, 9, 0);
        fetch(&mut d, 0);
        d.handle_progress(SIZE, SIZE, 5);
        d.handle_end(5);
        d.handle_failure(6);
        d.handle_fatal("late".into());
        assert_eq!(d.next(7), Step::Done);
    }
}
