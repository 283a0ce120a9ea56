//! Per-device publish limits: a token bucket per connection, so one device publishing as fast
//! as it can is cut off before it starves the others' messages in the shared ingest path.
//!
//! Sans-IO: the caller passes the monotonic time, so tests step it.

use std::time::Instant;

/// What a device may publish.
#[derive(Debug, Clone, Copy)]
pub struct PublishLimits {
    /// Sustained messages per second.
    pub rate: u32,
    /// Messages allowed in a burst above the sustained rate.
    pub burst: u32,
    /// Largest payload, in bytes.
    pub max_payload: usize,
}

/// Why a publish was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// The rate budget is spent: the device is disconnected with this reason.
    Rate,
    /// The payload alone is too large: the publish is refused, the device stays.
    Size,
}

impl Exceeded {
    pub fn reason(self) -> &'static str {
        match self {
            Exceeded::Rate => "publish rate limit exceeded",
            Exceeded::Size => "payload too large",
        }
    }
}

/// One connection's budget.
#[derive(Debug, Clone)]
pub struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    pub fn new(limits: &PublishLimits, now: Instant) -> Budget {
        Budget {
            tokens: f64::from(limits.burst.max(1)),
            last: now,
        }
    }

    /// Charges one publish of `payload_len` bytes at `now`.
    pub fn charge(
        &mut self,
        limits: &PublishLimits,
        payload_len: usize,
        now: Instant,
    ) -> Result<(), Exceeded> {
        if payload_len > limits.max_payload {
            return Err(Exceeded::Size);
        }
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        let cap = f64::from(limits.burst.max(1));
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(limits.rate)).min(cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Exceeded::Rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const L: PublishLimits = PublishLimits {
        rate: 10,
        burst: 20,
        max_payload: 4096,
    };

    #[test]
    fn a_burst_is_allowed_then_the_sustained_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(&L, t0);
        for _ in 0..20 {
            assert_eq!(b.charge(&L, 10, t0), Ok(()));
        }
        assert_eq!(b.charge(&L, 10, t0), Err(Exceeded::Rate));
        // 10/s: one more token every 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.charge(&L, 10, t1), Ok(()));
        assert_eq!(b.charge(&L, 10, t1), Err(Exceeded::Rate));
    }

    #[test]
    fn a_device_at_the_sustained_rate_is_never_cut_off() {
        let t0 = Instant::now();
        let mut b = Budget::new(&L, t0);
        for k in 0..10_000u64 {
            let now = t0 + Duration::from_millis(100 * k);
            assert_eq!(b.charge(&L, 100, now), Ok(()), "message {k}");
        }
    }

    #[test]
    fn the_budget_never_grows_past_the_burst_and_a_clock_that_stands_still_refills_nothing() {
        let t0 = Instant::now();
        let mut b = Budget::new(&L, t0);
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..20 {
            assert!(b.charge(&L, 1, later).is_ok());
        }
        assert_eq!(b.charge(&L, 1, later), Err(Exceeded::Rate));
    }

    #[test]
    fn an_oversized_payload_is_refused_without_spending_the_budget() {
        let t0 = Instant::now();
        let mut b = Budget::new(&L, t0);
        assert_eq!(b.charge(&L, 4097, t0), Err(Exceeded::Size));
        for _ in 0..20 {
            assert!(b.charge(&L, 4096, t0).is_ok());
        }
    }
}
