//! Capped exponential backoff with full jitter (the AWS Architecture Blog's "full jitter"):
//! the n-th retry waits a uniformly random time in `[0, min(cap, base * 2^n)]`. Full jitter
//! spreads a fleet that lost its broker at the same instant, so the broker is not hit by
//! every device at once when it returns.

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    pub base_ms: u64,
    pub cap_ms: u64,
    /// A connection that stays up this long resets the attempt count.
    pub stable_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base_ms: 500,
            cap_ms: 60_000,
            stable_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling_ms(&self) -> u64 {
        let exp = self
            .config
            .base_ms
            .saturating_mul(1u64 << self.attempt.min(32));
        exp.min(self.config.cap_ms)
    }

    /// Draws the next delay and counts the attempt.
    pub fn next_delay_ms(&mut self, rng: &mut Rng) -> u64 {
        let ceiling = self.ceiling_ms();
        self.attempt = self.attempt.saturating_add(1);
        rng.below(ceiling + 1)
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn stable_ms(&self) -> u64 {
        self.config.stable_ms
    }
}
