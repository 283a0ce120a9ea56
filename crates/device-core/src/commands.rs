//! The device's command intake: a bounded queue so a burst of commands never blocks the
//! connection or exhausts memory, and a memory of recent ids so a redelivered command
//! (QoS 1 may deliver twice) never runs twice.

use alloc::collections::VecDeque;
use alloc::string::String;

use flotilla_proto::{Command, CommandReply};

/// Why a command was not queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The same id ran or is queued already; carries the reply sent the first time, if final.
    Duplicate(Option<CommandReply>),
    Expired,
    QueueFull,
}

#[derive(Debug)]
pub struct CommandQueue {
    queue: VecDeque<Command>,
    capacity: usize,
    /// Ids seen recently with their final reply once known, oldest first.
    recent: VecDeque<(String, Option<CommandReply>)>,
    recent_capacity: usize,
}

impl CommandQueue {
    pub fn new(capacity: usize, recent_capacity: usize) -> Self {
        CommandQueue {
            queue: VecDeque::with_capacity(capacity),
            capacity,
            recent: VecDeque::with_capacity(recent_capacity),
            recent_capacity,
        }
    }

    /// Queues `command` unless it is a duplicate, already expired at `unix_now`, or the queue
    /// is full. `unix_now` is `None` while the device does not know the time; the server
    /// expires commands too, so the device then trusts it.
    pub fn offer(&mut self, command: Command, unix_now: Option<u64>) -> Result<(), Refusal> {
        if let Some((_, reply)) = self.recent.iter().find(|(id, _)| *id == command.id) {
            return Err(Refusal::Duplicate(reply.clone()));
        }
        if unix_now.is_some_and(|now| now >= command.expires_at) {
            self.remember(command.id, None);
            return Err(Refusal::Expired);
        }
        if self.queue.len() >= self.capacity {
            // Not remembered: the server may send it again once the queue has room.
            return Err(Refusal::QueueFull);
        }
        self.remember(command.id.clone(), None);
        self.queue.push_back(command);
        Ok(())
    }

    pub fn pop(&mut self) -> Option<Command> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Records the final reply so a redelivery can be answered without running again.
    pub fn record_reply(&mut self, reply: &CommandReply) {
        if let Some(slot) = self.recent.iter_mut().find(|(id, _)| *id == reply.id) {
            slot.1 = Some(reply.clone());
        }
    }

    /// A command that ran before the last reboot, with its final reply: a redelivery is
    /// answered with that reply and not run.
    pub fn remember_done(&mut self, reply: &CommandReply) {
        self.remember(reply.id.clone(), Some(reply.clone()));
    }

    fn remember(&mut self, id: String, reply: Option<CommandReply>) {
        if self.recent.len() >= self.recent_capacity {
            self.recent.pop_front();
        }
        self.recent.push_back((id, reply));
    }
}
