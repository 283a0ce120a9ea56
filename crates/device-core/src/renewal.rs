//! When a device renews its certificate: once a share of its life has passed, read from the
//! certificate's validity against the wall clock, and while renewals fail, again after a capped,
//! jittered delay. The shell does the HTTPS and key work; this decides only when.
//!
//! The wall clock may step (NTP at boot, a drifting RTC): a decision is never cached for
//! longer than [`RenewalPolicy::recheck_ms`], so a step forward is noticed within it, and a
//! step backward at worst renews early.

use crate::backoff::{Backoff, BackoffConfig};
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalPolicy {
    /// Renew once this share of the certificate's life, in thousandths, has passed.
    pub at_permille: u16,
    /// The longest a "not yet" holds before the clock is read again.
    pub recheck_ms: u64,
}

impl Default for RenewalPolicy {
    /// Two thirds of the life, as most fleet platforms do: a 397-day certificate renews
    /// after ~265 days, leaving months for a device that is offline when it falls due.
    fn default() -> Self {
        RenewalPolicy {
            at_permille: 667,
            recheck_ms: 3_600_000,
        }
    }
}

/// What the shell should do about the certificate now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Due,
    /// Ask again in this many milliseconds.
    NotYet {
        check_in_ms: u64,
    },
}

impl RenewalPolicy {
    /// The Unix time (ms) at which a certificate valid `[not_before, not_after]` (Unix
    /// seconds) falls due.
    pub fn due_at_ms(&self, not_before: i64, not_after: i64) -> i64 {
        let life_ms = not_after
            .saturating_sub(not_before)
            .max(0)
            .saturating_mul(1000);
        let share = i64::from(self.at_permille.min(1000));
        not_before
            .saturating_mul(1000)
            .saturating_add(life_ms / 1000 * share + life_ms % 1000 * share / 1000)
    }

    pub fn decide(&self, now_unix_ms: i64, not_before: i64, not_after: i64) -> Renewal {
        let due = self.due_at_ms(not_before, not_after);
        if now_unix_ms >= due {
            return Renewal::Due;
        }
        let wait = (due - now_unix_ms) as u64;
        Renewal::NotYet {
            check_in_ms: wait.min(self.recheck_ms),
        }
    }
}

/// The delay before the next attempt after a failed renewal: doubling from 30 s to an hour,
/// drawn from the upper half of the ceiling ("equal jitter"), so a fleet whose certificates
/// were issued together does not retry together, yet never retries at once.
#[derive(Debug, Clone)]
pub struct RenewalRetry {
    backoff: Backoff,
}

impl Default for RenewalRetry {
    fn default() -> Self {
        RenewalRetry {
            backoff: Backoff::new(BackoffConfig {
                base_ms: 30_000,
                cap_ms: 3_600_000,
                stable_ms: 0,
            }),
        }
    }
}

impl RenewalRetry {
    /// After a failure; `at_least_ms` is what the server asked for (`Retry-After`).
    pub fn next_delay_ms(&mut self, rng: &mut Rng, at_least_ms: u64) -> u64 {
        let ceiling = self.backoff.ceiling_ms();
        let _ = self.backoff.next_delay_ms(rng);
        let half = ceiling / 2;
        (half + rng.below(ceiling - half + 1)).max(at_least_ms)
    }

    pub fn succeeded(&mut self) {
        self.backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn a_certificate_falls_due_at_its_share_of_life() {
        let p = RenewalPolicy::default();
        let nb = 1_700_000_000;
        let na = nb + 397 * DAY;
        let due = p.due_at_ms(nb, na);
        assert_eq!(due, nb * 1000 + 397 * DAY * 667);
        assert_eq!(p.decide(due, nb, na), Renewal::Due);
        assert_eq!(
            p.decide(due - 10, nb, na),
            Renewal::NotYet { check_in_ms: 10 }
        );
        // Far from due: the clock is read again within the recheck bound.
        assert_eq!(
            p.decide(nb * 1000, nb, na),
            Renewal::NotYet {
                check_in_ms: 3_600_000
            }
        );
    }

    #[test]
    fn a_clock_that_steps_is_noticed_within_the_recheck_bound() {
        let p = RenewalPolicy::default();
        let (nb, na) = (1_000, 1_000 + 300 * DAY);
        let before = p.decide(nb * 1000, nb, na);
        assert!(matches!(before, Renewal::NotYet { check_in_ms } if check_in_ms <= p.recheck_ms));
        // The wall clock steps a year forward: the next check renews.
        assert_eq!(p.decide((nb + 365 * DAY) * 1000, nb, na), Renewal::Due);
        // Expired already (a device that was off for a long time): due, not "never".
        assert_eq!(p.decide((na + DAY) * 1000, nb, na), Renewal::Due);
        // A certificate with no life is due from its start.
        assert_eq!(p.decide(nb * 1000, nb, nb), Renewal::Due);
    }

    #[test]
    fn retries_back_off_with_jitter_to_a_cap_and_honour_the_server() {
        let mut rng = Rng::new(7);
        let mut retry = RenewalRetry::default();
        let first = retry.next_delay_ms(&mut rng, 0);
        assert!((15_000..=30_000).contains(&first));
        let mut last = 0;
        for _ in 0..20 {
            last = retry.next_delay_ms(&mut rng, 0);
        }
        assert!((1_800_000..=3_600_000).contains(&last));
        assert_eq!(retry.next_delay_ms(&mut rng, 7_200_000), 7_200_000);
        retry.succeeded();
        assert!(retry.next_delay_ms(&mut rng, 0) <= 30_000);
    }
}
