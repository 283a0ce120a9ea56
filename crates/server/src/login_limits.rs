//! Limits on failed logins, per (account, source address) and per source address, so an
//! attacker guessing from one place is stopped without locking the account's owner out from
//! anywhere else; and on anonymous requests per source address (`/sign-csr`, registration).
//!
//! An attempt reserves its count when it starts (a success gives it back), so a burst of
//! concurrent guesses is counted as it arrives, not after the password checks. Addresses are
//! keyed as their network: IPv4 by address, IPv6 by /64 (one host holds a whole /64). Refusals
//! report whether they are the first of their window, so callers audit a flood once.
//!
//! Sans-IO: every method takes the monotonic `now`, so tests step the clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures of one account from one address before that pair is refused for [`WINDOW`].
pub const MAX_PER_ACCOUNT_AND_ADDRESS: u32 = 5;
/// Failures from one address, over all accounts, before the address is refused.
pub const MAX_PER_ADDRESS: u32 = 50;
/// Failed anonymous requests (or registrations) from one address per window.
pub const MAX_ANONYMOUS: u32 = 50;
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries kept at most per table; beyond it, expired ones are swept.
const MAX_ENTRIES: usize = 100_000;

/// The key an address is counted under: IPv4 (also IPv4-mapped IPv6) as itself, IPv6 by /64.
pub fn address_key(ip: Option<IpAddr>) -> Option<IpAddr> {
    ip.map(|ip| match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    })
}

/// Attempts counted in fixed windows that start at the first attempt.
#[derive(Debug)]
struct Counts<K> {
    counts: HashMap<K, (u32, Instant)>,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts {
            counts: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Counts<K> {
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

    fn give_back(&mut self, key: &K) {
        if let Some((n, _)) = self.counts.get_mut(key) {
            *n = n.saturating_sub(1);
        }
    }

    fn clear(&mut self, key: &K) {
        self.counts.remove(key);
    }
}

/// Why an attempt is refused before any work, and whether it is the first refusal of its
/// window (the one to audit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub why: RefusedFor,
    pub first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedFor {
    AccountFromThisAddress,
    Address,
}

impl RefusedFor {
    pub fn reason(self) -> &'static str {
        match self {
            RefusedFor::AccountFromThisAddress => {
                "too many failures for this account from this address"
            }
            RefusedFor::Address => "too many failures from this address",
        }
    }
}

/// Whether a login attempt is refused, given the failures its address and its (account,
/// address) pair already had in their windows.
pub fn login_decision(by_address: u64, by_pair: u64) -> Result<(), Refused> {
    if by_address >= u64::from(MAX_PER_ADDRESS) {
        return Err(Refused {
            why: RefusedFor::Address,
            first: by_address == u64::from(MAX_PER_ADDRESS),
        });
    }
    if by_pair >= u64::from(MAX_PER_ACCOUNT_AND_ADDRESS) {
        return Err(Refused {
            why: RefusedFor::AccountFromThisAddress,
            first: by_pair == u64::from(MAX_PER_ACCOUNT_AND_ADDRESS),
        });
    }
    Ok(())
}

/// Whether an anonymous request is refused, given the failures its address already had.
pub fn anonymous_decision(by_address: u64) -> Result<(), Refused> {
    if by_address >= u64::from(MAX_ANONYMOUS) {
        return Err(Refused {
            why: RefusedFor::Address,
            first: by_address == u64::from(MAX_ANONYMOUS),
        });
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct LoginLimiter {
    inner: Mutex<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    pairs: Counts<(String, Option<IpAddr>)>,
    addresses: Counts<Option<IpAddr>>,
}

impl LoginLimiter {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a login attempt: refused, or counted as a failure until [`Self::succeeded`].
    pub fn begin(&self, account: &str, from: Option<IpAddr>, now: Instant) -> Result<(), Refused> {
        let from = address_key(from);
        let pair = (account.to_string(), from);
        let mut t = self.tables();
        let (by_address, by_pair) = (t.addresses.count(&from, now), t.pairs.count(&pair, now));
        // Refusals count too, so the first one of a window is the one at the limit.
        t.addresses.add(from, now);
        t.pairs.add(pair, now);
        login_decision(u64::from(by_address), u64::from(by_pair))
    }

    /// The attempt had the right password: its pair starts afresh and the address gets its
    /// count back (a flood from an address that also knows one password stays counted).
    pub fn succeeded(&self, account: &str, from: Option<IpAddr>) {
        let from = address_key(from);
        let mut t = self.tables();
        t.pairs.clear(&(account.to_string(), from));
        t.addresses.give_back(&from);
    }
}

/// Anonymous requests per source address: past [`MAX_ANONYMOUS`] in a window the address is
/// refused before any work.
#[derive(Debug, Default)]
pub struct AnonymousLimiter {
    inner: Mutex<Counts<Option<IpAddr>>>,
}

impl AnonymousLimiter {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts<Option<IpAddr>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a request: refused, or counted until [`Self::succeeded`] gives it back.
    pub fn begin(&self, from: Option<IpAddr>, now: Instant) -> Result<(), Refused> {
        let from = address_key(from);
        let mut t = self.counts();
        let n = t.count(&from, now);
        t.add(from, now);
        anonymous_decision(u64::from(n))
    }

    pub fn succeeded(&self, from: Option<IpAddr>) {
        self.counts().give_back(&address_key(from));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn fail(l: &LoginLimiter, account: &str, from: &str, t: Instant) -> Result<(), Refused> {
        l.begin(account, ip(from), t)
    }

    #[test]
    fn failures_from_one_address_do_not_lock_the_account_elsewhere() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for _ in 0..MAX_PER_ACCOUNT_AND_ADDRESS {
            assert!(fail(&l, "admin@x", "10.0.0.66", t).is_ok());
        }
        assert_eq!(
            fail(&l, "admin@x", "10.0.0.66", t),
            Err(Refused {
                why: RefusedFor::AccountFromThisAddress,
                first: true
            })
        );
        assert_eq!(
            fail(&l, "admin@x", "10.0.0.66", t).map_err(|r| r.first),
            Err(false)
        );
        assert!(fail(&l, "admin@x", "10.0.0.7", t).is_ok());
    }

    #[test]
    fn an_address_guessing_many_accounts_is_refused_for_all() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for k in 0..MAX_PER_ADDRESS {
            assert!(fail(&l, &format!("user{k}@x"), "10.0.0.66", t).is_ok());
        }
        assert_eq!(
            fail(&l, "new@x", "10.0.0.66", t).map_err(|r| r.why),
            Err(RefusedFor::Address)
        );
        assert!(fail(&l, "new@x", "10.0.0.7", t).is_ok());
    }

    #[test]
    fn a_concurrent_burst_is_counted_as_it_arrives() {
        // Every attempt reserves before its password is checked: the sixth of a burst is
        // refused even though none of the five has failed yet.
        let l = LoginLimiter::default();
        let t = Instant::now();
        let started: Vec<_> = (0..8)
            .map(|_| fail(&l, "admin@x", "10.0.0.66", t))
            .collect();
        assert_eq!(started.iter().filter(|r| r.is_ok()).count(), 5);
    }

    #[test]
    fn one_ipv6_host_rotating_through_its_64_is_one_address() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for k in 0..MAX_PER_ADDRESS {
            let from = format!("2001:db8:1:2::{k:x}");
            assert!(fail(&l, &format!("u{k}@x"), &from, t).is_ok());
        }
        assert!(fail(&l, "v@x", "2001:db8:1:2:ffff::1", t).is_err());
        assert!(fail(&l, "v@x", "2001:db8:1:3::1", t).is_ok());
        assert_eq!(address_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

    #[test]
    fn limits_lift_after_the_window_on_a_stepped_clock() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for _ in 0..MAX_PER_ACCOUNT_AND_ADDRESS {
            let _ = fail(&l, "a@x", "10.0.0.66", t);
        }
        assert!(fail(&l, "a@x", "10.0.0.66", t + WINDOW - Duration::from_secs(1)).is_err());
        assert!(fail(&l, "a@x", "10.0.0.66", t + WINDOW).is_ok());
    }

    #[test]
    fn success_clears_the_pair_and_gives_back_only_its_own_count() {
        let l = LoginLimiter::default();
        let t = Instant::now();
        for k in 0..MAX_PER_ADDRESS - 1 {
            let _ = fail(&l, &format!("u{k}@x"), "10.0.0.66", t);
        }
        assert!(fail(&l, "a@x", "10.0.0.66", t).is_ok());
        l.succeeded("a@x", ip("10.0.0.66"));
        // 49 failures stand; one more attempt is allowed, then the address is refused.
        assert!(fail(&l, "a@x", "10.0.0.66", t).is_ok());
        assert!(fail(&l, "b@x", "10.0.0.66", t).is_err());
    }

    #[test]
    fn anonymous_requests_are_refused_past_the_limit_and_only_the_first_refusal_is_marked() {
        let l = AnonymousLimiter::default();
        let t = Instant::now();
        for _ in 0..MAX_ANONYMOUS {
            assert!(l.begin(ip("10.0.0.66"), t).is_ok());
        }
        assert_eq!(l.begin(ip("10.0.0.66"), t).map_err(|r| r.first), Err(true));
        for _ in 0..100 {
            assert_eq!(l.begin(ip("10.0.0.66"), t).map_err(|r| r.first), Err(false));
        }
        assert!(l.begin(ip("10.0.0.7"), t).is_ok());
        assert!(l.begin(ip("10.0.0.66"), t + WINDOW).is_ok());
    }

    #[test]
    fn a_successful_anonymous_request_gives_its_count_back() {
        let l = AnonymousLimiter::default();
        let t = Instant::now();
        for _ in 0..1000 {
            assert!(l.begin(ip("10.0.0.66"), t).is_ok());
            l.succeeded(ip("10.0.0.66"));
        }
    }
}
