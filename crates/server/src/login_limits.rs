//! Limits on failed logins, per (account, source address) and per source address, so an
//! attacker guessing from one place is stopped without locking the account's owner out from
//! anywhere else.
//!
//! Sans-IO: every method takes the monotonic `now`, so tests step the clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures of one account from one address before that pair is refused for [`WINDOW`].
pub const MAX_PER_ACCOUNT_AND_ADDRESS: u32 = 5;
/// Failures from one address, over all accounts, before the address is refused.
pub const MAX_PER_ADDRESS: u32 = 50;
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries kept at most per table; beyond it, expired ones are swept.
const MAX_ENTRIES: usize = 100_000;

/// Failures counted in fixed windows that start at the first failure.
#[derive(Debug, Default)]
struct FailureCounts<K> {
    counts: HashMap<K, (u32, Instant)>,
}

impl<K: std::hash::Hash + Eq> FailureCounts<K> {
    fn count(&self, key: &K, now: Instant) -> u32 {
        self.counts
            .get(key)
            .filter(|(_, since)| now.saturating_duration_since(*since) < WINDOW)
            .map_or(0, |(n, _)| *n)
    }

    fn add(&mut self, key: K, now: Instant) {
        if self.counts.len() >= MAX_ENTRIES {
            self.counts
                .retain(|_, (_, since)| now.saturating_duration_since(*since) < WINDOW);
        }
        if self.counts.len() >= MAX_ENTRIES && !self.counts.contains_key(&key) {
            // Still full of live entries: refuse to grow (the per-address table then keeps
            // the flood's source counted).
            return;
        }
        let entry = self.counts.entry(key).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    fn clear(&mut self, key: &K) {
        self.counts.remove(key);
    }
}

/// Failed anonymous requests per source address (`/sign-csr`): past [`MAX_ANONYMOUS`] in a
/// window the address is refused before any work, and only the refusal that starts it is
/// audited, so a flood writes a bounded number of audit rows.
#[derive(Debug, Default)]
pub struct AnonymousLimiter {
    inner: Mutex<FailureCounts<Option<IpAddr>>>,
}

pub const MAX_ANONYMOUS: u32 = 20;

/// The address is refused; `first` is true for the refusal that should be audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRefused {
    pub first: bool,
}

impl AnonymousLimiter {
    pub fn check(&self, from: Option<IpAddr>, now: Instant) -> Result<(), AddressRefused> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.count(&from, now);
        if n < MAX_ANONYMOUS {
            return Ok(());
        }
        // Counting refusals too: the one that reaches MAX_ANONYMOUS + 1 is the first.
        t.add(from, now);
        Err(AddressRefused {
            first: n == MAX_ANONYMOUS,
        })
    }

    pub fn record_failure(&self, from: Option<IpAddr>, now: Instant) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(from, now);
    }
}

#[derive(Debug, Default)]
pub struct LoginLimiter {
    inner: Mutex<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    pairs: FailureCounts<(String, Option<IpAddr>)>,
    addresses: FailureCounts<Option<IpAddr>>,
}

/// Why a login attempt is refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    AccountFromThisAddress,
    Address,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::AccountFromThisAddress => {
                "too many failures for this account from this address"
            }
            Refused::Address => "too many failures from this address",
        }
    }
}

impl LoginLimiter {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn check(&self, account: &str, from: Option<IpAddr>, now: Instant) -> Result<(), Refused> {
        let t = self.tables();
        if t.addresses.count(&from, now) >= MAX_PER_ADDRESS {
            return Err(Refused::Address);
        }
        if t.pairs.count(&(account.to_string(), from), now) >= MAX_PER_ACCOUNT_AND_ADDRESS {
            return Err(Refused::AccountFromThisAddress);
        }
        Ok(())
    }

    pub fn record_failure(&self, account: &str, from: Option<IpAddr>, now: Instant) {
        let mut t = self.tables();
        t.pairs.add((account.to_string(), from), now);
        t.addresses.add(from, now);
    }

    /// A good password clears that pair's count (not the address's: a flood from an address
    /// that also knows one password stays counted).
    pub fn record_success(&self, account: &str, from: Option<IpAddr>) {
        self.tables().pairs.clear(&(account.to_string(), from));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn failures_from_one_address_do_not_lock_the_account_elsewhere() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for _ in 0..MAX_PER_ACCOUNT_AND_ADDRESS {
            assert!(l.check("admin@x", ip("10.0.0.66"), t).is_ok());
            l.record_failure("admin@x", ip("10.0.0.66"), t);
        }
        assert_eq!(
            l.check("admin@x", ip("10.0.0.66"), t),
            Err(Refused::AccountFromThisAddress)
        );
        assert!(l.check("admin@x", ip("10.0.0.7"), t).is_ok());
    }

    #[test]
    fn an_address_guessing_many_accounts_is_refused_for_all() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for k in 0..MAX_PER_ADDRESS {
            l.record_failure(&format!("user{k}@x"), ip("10.0.0.66"), t);
        }
        assert_eq!(l.check("new@x", ip("10.0.0.66"), t), Err(Refused::Address));
        assert!(l.check("new@x", ip("10.0.0.7"), t).is_ok());
    }

    #[test]
    fn limits_lift_after_the_window_on_a_stepped_clock() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for _ in 0..MAX_PER_ACCOUNT_AND_ADDRESS {
            l.record_failure("a@x", ip("10.0.0.66"), t);
        }
        assert!(
            l.check("a@x", ip("10.0.0.66"), t + WINDOW - Duration::from_secs(1))
                .is_err()
        );
        assert!(l.check("a@x", ip("10.0.0.66"), t + WINDOW).is_ok());
    }

    #[test]
    fn anonymous_failures_are_refused_past_the_limit_and_only_the_first_refusal_is_audited() {
        let l = AnonymousLimiter::default();
        let t = Instant::now();
        for _ in 0..MAX_ANONYMOUS {
            assert!(l.check(ip("10.0.0.66"), t).is_ok());
            l.record_failure(ip("10.0.0.66"), t);
        }
        assert_eq!(
            l.check(ip("10.0.0.66"), t),
            Err(AddressRefused { first: true })
        );
        for _ in 0..100 {
            assert_eq!(
                l.check(ip("10.0.0.66"), t),
                Err(AddressRefused { first: false })
            );
        }
        assert!(l.check(ip("10.0.0.7"), t).is_ok());
        assert!(l.check(ip("10.0.0.66"), t + WINDOW).is_ok());
    }

    #[test]
    fn success_clears_the_pair_but_not_the_address() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for k in 0..MAX_PER_ADDRESS - 1 {
            l.record_failure(&format!("u{k}@x"), ip("10.0.0.66"), t);
        }
        l.record_failure("a@x", ip("10.0.0.66"), t);
        l.record_success("a@x", ip("10.0.0.66"));
        assert_eq!(l.check("a@x", ip("10.0.0.66"), t), Err(Refused::Address));
    }
}
