//! Per-device publish limits: a token bucket per device (not per connection, so reconnecting
//! does not refill it), charged for every PUBLISH and SUBSCRIBE a device sends, refused ones
//! included. A device that spends its burst is disconnected and refused at CONNECT for
//! [`PENALTY`], so one device publishing as fast as it can is cut off before it starves the
//! others' messages in the shared ingest path.
//!
//! Sans-IO: callers pass the monotonic time, so tests step it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a device that exceeded its rate is refused at CONNECT.
pub const PENALTY: Duration = Duration::from_secs(10);

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
    /// The payload alone is too large: the publish is refused (and charged), the device stays.
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

/// One device's budget.
#[derive(Debug, Clone)]
struct Budget {
    tokens: f64,
    last: Instant,
    refused_until: Option<Instant>,
}

impl Budget {
    fn new(limits: &PublishLimits, now: Instant) -> Budget {
        Budget {
            tokens: f64::from(limits.burst.max(1)),
            last: now,
            refused_until: None,
        }
    }

    fn take(&mut self, limits: &PublishLimits, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        let cap = f64::from(limits.burst.max(1));
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(limits.rate)).min(cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The budgets of every device that has connected. Only authenticated devices get an entry,
/// so the table is bounded by the provisioned fleet.
#[derive(Debug)]
pub struct DeviceLimiter {
    limits: PublishLimits,
    budgets: Mutex<HashMap<String, Budget>>,
}

impl DeviceLimiter {
    pub fn new(limits: PublishLimits) -> DeviceLimiter {
        DeviceLimiter {
            limits,
            budgets: Mutex::new(HashMap::new()),
        }
    }

    fn budgets(&self) -> std::sync::MutexGuard<'_, HashMap<String, Budget>> {
        self.budgets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the device may connect now (it is not serving a penalty).
    pub fn may_connect(&self, device: &str, now: Instant) -> bool {
        self.budgets()
            .get(device)
            .and_then(|b| b.refused_until)
            .is_none_or(|until| now >= until)
    }

    /// Charges one packet (a SUBSCRIBE, or a PUBLISH of `payload_len` bytes) at `now`.
    pub fn charge(&self, device: &str, payload_len: usize, now: Instant) -> Result<(), Exceeded> {
        let mut budgets = self.budgets();
        let budget = budgets
            .entry(device.to_string())
            .or_insert_with(|| Budget::new(&self.limits, now));
        if !budget.take(&self.limits, now) {
            budget.refused_until = Some(now + PENALTY);
            return Err(Exceeded::Rate);
        }
        if payload_len > self.limits.max_payload {
            return Err(Exceeded::Size);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: PublishLimits = PublishLimits {
        rate: 10,
        burst: 20,
        max_payload: 4096,
    };

    #[test]
    fn a_burst_is_allowed_then_the_sustained_rate() {
        let l = DeviceLimiter::new(L);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert_eq!(l.charge("a", 10, t0), Ok(()));
        }
        assert_eq!(l.charge("a", 10, t0), Err(Exceeded::Rate));
        // 10/s: one more token every 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(l.charge("a", 10, t1), Ok(()));
        assert_eq!(l.charge("a", 10, t1), Err(Exceeded::Rate));
        // Another device has its own budget.
        assert_eq!(l.charge("b", 10, t1), Ok(()));
    }

    #[test]
    fn a_device_at_the_sustained_rate_is_never_cut_off() {
        let l = DeviceLimiter::new(L);
        let t0 = Instant::now();
        for k in 0..10_000u64 {
            let now = t0 + Duration::from_millis(100 * k);
            assert_eq!(l.charge("a", 100, now), Ok(()), "message {k}");
        }
    }

    #[test]
    fn a_device_over_its_rate_is_refused_at_connect_for_the_penalty_on_a_stepped_clock() {
        let l = DeviceLimiter::new(L);
        let t0 = Instant::now();
        assert!(l.may_connect("a", t0));
        while l.charge("a", 1, t0).is_ok() {}
        assert!(!l.may_connect("a", t0));
        assert!(!l.may_connect("a", t0 + PENALTY - Duration::from_millis(1)));
        assert!(l.may_connect("a", t0 + PENALTY));
        assert!(l.may_connect("b", t0));
    }

    #[test]
    fn reconnecting_does_not_refill_the_budget() {
        // The budget lives with the device id, not with a connection: the same limiter
        // serves every connection of the device.
        let l = DeviceLimiter::new(L);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(l.charge("a", 1, t0).is_ok());
        }
        let after_penalty = t0 + PENALTY;
        assert!(l.may_connect("a", after_penalty));
        // 10 s at 10/s refilled the burst, no more.
        for _ in 0..20 {
            assert!(l.charge("a", 1, after_penalty).is_ok());
        }
        assert_eq!(l.charge("a", 1, after_penalty), Err(Exceeded::Rate));
    }

    #[test]
    fn the_budget_never_grows_past_the_burst() {
        let l = DeviceLimiter::new(L);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        assert!(l.charge("a", 1, t0).is_ok());
        for _ in 0..20 {
            assert!(l.charge("a", 1, later).is_ok());
        }
        assert_eq!(l.charge("a", 1, later), Err(Exceeded::Rate));
    }

    #[test]
    fn an_oversized_payload_is_refused_and_still_charged() {
        let l = DeviceLimiter::new(L);
        let t0 = Instant::now();
        for _ in 0..20 {
            assert_eq!(l.charge("a", 4097, t0), Err(Exceeded::Size));
        }
        assert_eq!(l.charge("a", 1, t0), Err(Exceeded::Rate));
    }
}
