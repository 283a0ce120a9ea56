//! Caps on open connections, in total and per source address, for a listener whose accept
//! loop is ours: a host opening connections and never using them fills its own share, not the
//! process's sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Admits connections while both caps hold.
#[derive(Debug, Clone)]
pub struct ConnectionGate {
    max_total: usize,
    max_per_address: usize,
    counts: Arc<Mutex<Counts>>,
}

/// Held while a connection is open; dropping it frees the slot.
#[derive(Debug)]
pub struct Admitted {
    gate: ConnectionGate,
    address: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_address.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                c.by_address.remove(&self.address);
            }
        }
    }
}

impl ConnectionGate {
    pub fn new(max_total: usize, max_per_address: usize) -> ConnectionGate {
        ConnectionGate {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            counts: Arc::new(Mutex::new(Counts {
                total: 0,
                by_address: HashMap::new(),
            })),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `address`, or `None` when a cap is reached.
    pub fn admit(&self, address: IpAddr) -> Option<Admitted> {
        let mut c = self.counts();
        let from_here = c.by_address.get(&address).copied().unwrap_or(0);
        if c.total >= self.max_total || from_here >= self.max_per_address {
            return None;
        }
        c.total += 1;
        *c.by_address.entry(address).or_insert(0) += 1;
        drop(c);
        Some(Admitted {
            gate: self.clone(),
            address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_fills_only_its_own_share() {
        let gate = ConnectionGate::new(10, 3);
        let held: Vec<_> = (0..3).filter_map(|_| gate.admit(ip("10.0.0.66"))).collect();
        assert_eq!(held.len(), 3);
        assert!(gate.admit(ip("10.0.0.66")).is_none());
        assert!(gate.admit(ip("10.0.0.7")).is_some());
    }

    #[test]
    fn slots_come_back_when_connections_close_and_the_total_holds() {
        let gate = ConnectionGate::new(4, 4);
        let mut held: Vec<_> = (0..4)
            .filter_map(|k| gate.admit(ip(&format!("10.0.0.{k}"))))
            .collect();
        assert!(gate.admit(ip("10.0.0.9")).is_none(), "total cap");
        held.pop();
        assert!(gate.admit(ip("10.0.0.9")).is_some());
        drop(held);
        let c = gate.counts();
        assert_eq!((c.total, c.by_address.len()), (0, 0));
    }
}
