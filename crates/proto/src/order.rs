//! The order in which one device said things, whichever server replica takes each message and
//! however late: a backlog a replica drains after a crash, or a redelivery, arrives after
//! newer messages that another replica already stored. A state message (heartbeat, status,
//! reading, will) carries an order key; the server applies it to a group of the device's
//! fields only if its key is not below the key of the message that last set that group.
//!
//! A key is `session << 23 | n`. A session is one broker connection: its number is taken at
//! connect from a counter that only rises, across reboots too (the device's telemetry
//! sequence, reserved in flash). `n` counts the session's messages from 1. The session's will
//! is sent by the broker only after all of them, so it carries [`WILL_N`], above every `n`,
//! and below the next session's first message.

/// Bits of `n`, a message's place within its session.
pub const ORDER_N_BITS: u32 = 23;

/// The `n` of a session's will, the last thing the session says. A session's `n` stops just
/// below it: after 8,388,606 messages on one connection, later ones tie (and apply in the
/// order the server stores them).
pub const WILL_N: u32 = (1 << ORDER_N_BITS) - 1;

/// Sessions numbered at or above this share the highest session: 2^40, a number the
/// telemetry sequence (which readings and connections both draw from) reaches after 34,000
/// years at one a second.
const MAX_SESSION: u64 = (1 << (63 - ORDER_N_BITS)) - 1;

/// The key of message `n` of `session`; always at most `i64::MAX`, so the server stores it as
/// a signed 64-bit integer.
pub fn order_key(session: u64, n: u32) -> u64 {
    (session.min(MAX_SESSION) << ORDER_N_BITS) | u64::from(n.min(WILL_N))
}

/// One session's keys, as a device hands them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionOrder {
    session: u64,
    sent: u32,
}

impl SessionOrder {
    /// A new session numbered `session` (a value never used for a session before).
    pub fn new(session: u64) -> SessionOrder {
        SessionOrder { session, sent: 0 }
    }

    /// The key of the session's next message.
    pub fn next_key(&mut self) -> u64 {
        self.sent = (self.sent + 1).min(WILL_N - 1);
        order_key(self.session, self.sent)
    }

    /// The key of the session's will.
    pub fn will_key(&self) -> u64 {
        order_key(self.session, WILL_N)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sessions_messages_rise_its_will_is_last_and_the_next_session_is_above_it() {
        let mut first = SessionOrder::new(7);
        let keys: alloc::vec::Vec<u64> = (0..3).map(|_| first.next_key()).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        assert!(first.will_key() > keys[2]);
        let mut next = SessionOrder::new(8);
        assert!(next.next_key() > first.will_key());
    }

    #[test]
    fn keys_saturate_within_i64_and_a_long_session_never_reaches_its_will() {
        assert!(order_key(u64::MAX, u32::MAX) <= i64::MAX as u64);
        let mut s = SessionOrder {
            session: 1,
            sent: WILL_N - 2,
        };
        let (a, b) = (s.next_key(), s.next_key());
        assert_eq!(a, b, "the last key below the will repeats");
        assert!(b < s.will_key());
    }
}
