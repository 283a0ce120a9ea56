//! Messages that must arrive. Each carries a [`Token`] that the shell gives back once the
//! broker acknowledged it (PUBACK). Until then the message is kept: sent again after every
//! reconnect, retried a while after the broker refused it, and what waits on its delivery
//! (recording an OTA outcome as reported, a reboot) waits.

use alloc::collections::VecDeque;

use crate::device::{Millis, Publish};

/// At least how long after a refused publish (a PUBACK with an error reason) it is sent
/// again; up to half as long again is drawn at random, so a fleet refused at one instant (an
/// overloaded broker) does not come back at one instant.
pub const RETRY_MS: Millis = 5_000;

/// Names one publish that must arrive; the shell hands it back to
/// [`crate::Device::handle_published`] or [`crate::Device::handle_publish_refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(u32);

impl Token {
    /// The number behind the token, for logs.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// What the delivery of a message lets happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Then {
    Nothing,
    /// The outcome of update `.0` arrived: it need not be reported again after a reboot.
    OtaReported(alloc::string::String),
    /// The reply to a reboot command arrived: the device may restart.
    Reboot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Waits for a connection.
    No,
    /// Handed to the shell on this connection; waits for its acknowledgement.
    InFlight,
    /// Refused by the broker; sent again at this time.
    RetryAt(Millis),
}

#[derive(Debug)]
struct Entry {
    token: Token,
    publish: Publish,
    then: Then,
    sent: Sent,
}

/// The messages not yet acknowledged, oldest first, at most `capacity` of them.
#[derive(Debug)]
pub(crate) struct Outbox {
    entries: VecDeque<Entry>,
    capacity: usize,
    next_token: u32,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Outbox {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            next_token: 0,
        }
    }

    /// Keeps `publish` until it is acknowledged. A full outbox lets its oldest plain message
    /// go (a command reply), and only when it holds nothing else its oldest message (what
    /// depended on it does not happen: an OTA outcome stays persisted and is reported after
    /// the next boot, a reboot happens at its deadline).
    /// With `connected`, the message goes out at once: it is returned, with its token, for
    /// the shell.
    pub(crate) fn push(
        &mut self,
        mut publish: Publish,
        then: Then,
        connected: bool,
    ) -> Option<Publish> {
        if self.entries.len() >= self.capacity {
            let plain = self.entries.iter().position(|e| e.then == Then::Nothing);
            self.entries.remove(plain.unwrap_or(0));
        }
        self.next_token = self.next_token.wrapping_add(1);
        let token = Token(self.next_token);
        publish.token = Some(token);
        let now = connected.then(|| publish.clone());
        self.entries.push_back(Entry {
            token,
            publish,
            then,
            sent: if connected { Sent::InFlight } else { Sent::No },
        });
        now
    }

    /// The broker has it: forget it and say what follows. `None` for a token not (or no
    /// longer) held, such as a second acknowledgement.
    pub(crate) fn acknowledged(&mut self, token: Token) -> Option<Then> {
        let at = self.entries.iter().position(|e| e.token == token)?;
        self.entries.remove(at).map(|e| e.then)
    }

    /// The broker refused it: send it again at `retry_at`.
    pub(crate) fn refused(&mut self, token: Token, retry_at: Millis) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.token == token) {
            e.sent = Sent::RetryAt(retry_at);
        }
    }

    /// The connection ended: nothing is in flight any more.
    pub(crate) fn disconnected(&mut self) {
        for e in &mut self.entries {
            e.sent = Sent::No;
        }
    }

    /// The messages to hand to the shell now, on a live connection: those never sent on it
    /// and those whose retry is due.
    pub(crate) fn due(&mut self, now: Millis) -> impl Iterator<Item = Publish> + '_ {
        self.entries.iter_mut().filter_map(move |e| {
            let due = match e.sent {
                Sent::No => true,
                Sent::RetryAt(at) => at <= now,
                Sent::InFlight => false,
            };
            due.then(|| {
                e.sent = Sent::InFlight;
                e.publish.clone()
            })
        })
    }

    /// When the next refused message is to be sent again.
    pub(crate) fn next_retry(&self) -> Option<Millis> {
        self.entries
            .iter()
            .filter_map(|e| match e.sent {
                Sent::RetryAt(at) => Some(at),
                _ => None,
            })
            .min()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
