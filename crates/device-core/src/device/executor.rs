//! The executor: commands from the server, queued (bounded), run one per timeout so a long
//! queue never starves the heartbeat, each at most once — a redelivered id is answered with
//! the reply it got, and the ids of commands that must not run twice (`reboot`) survive a
//! reboot in NVS — and the actuators they drive (the LED).
//!
//! Inputs: [`Executor::boot`], [`Executor::offer`] for each command that arrives,
//! [`Executor::reboot_acknowledged`] when the reply a reboot waits for got its PUBACK.
//! Timers: the next execution and the reboot's wait for that PUBACK
//! ([`Executor::next_timeout`], [`Executor::execute_due`], [`Executor::reboot_due`]: the
//! façade runs the second after the OTA timers, so a confirmation due at the same moment
//! comes before the restart). Outputs: [`Effect`]s, which the
//! façade turns into publishes, NVS writes, LED actions and the restart, in order.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use flotilla_proto::{Command, CommandReply, CommandStatus, DeviceCommand, LedState, SensorKind};
use serde_json::{Value, json};

use super::{COMMANDS_DONE_KEPT, Config, Millis, Persist};
use crate::commands::{CommandQueue, Refusal};

const RECENT_COMMAND_IDS: usize = 32;

/// What the executor asks of the rest of the device, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Send a reply: an ACCEPTED one may be lost, a final one must arrive; `reboot_after`:
    /// the restart waits for this reply's acknowledgement.
    Reply {
        reply: CommandReply,
        reboot_after: bool,
    },
    Persist(Persist),
    /// Drive the LED, keep its state in NVS and report it.
    SetLed {
        state: LedState,
        brightness: u8,
    },
    /// Turn a sensor's reporting on or off (its next telemetry shows it; no status is sent).
    SetSensor {
        sensor: SensorKind,
        enabled: bool,
    },
    /// Restart now.
    Reboot,
}

#[derive(Debug)]
pub(crate) struct Executor {
    queue: CommandQueue,
    /// Final replies of executed commands that must not run twice, as persisted.
    done: VecDeque<CommandReply>,
    reboot_wait_ms: u64,
    execute_at: Option<Millis>,
    /// A reboot waits for its reply's acknowledgement until then.
    reboot_at: Option<Millis>,
    led: LedState,
    brightness: u8,
}

impl Executor {
    pub fn new(config: &Config) -> Executor {
        Executor {
            queue: CommandQueue::new(config.command_queue, RECENT_COMMAND_IDS),
            done: VecDeque::new(),
            reboot_wait_ms: config.reboot_wait_ms,
            execute_at: None,
            reboot_at: None,
            led: LedState::Off,
            brightness: 100,
        }
    }

    /// Power-on: the LED as NVS kept it (see [`Executor::led`]), and the commands that ran
    /// before. The newest of
    /// those may be the reboot whose reply never got its PUBACK (the wait ran out, a power
    /// cut): the server waits for it and nothing else would send it again, so it is sent
    /// again (a repeat of a final reply changes nothing at the server).
    pub fn boot(
        &mut self,
        led: Option<LedState>,
        brightness: Option<u8>,
        done: Vec<CommandReply>,
        out: &mut Vec<Effect>,
    ) {
        self.led = led.unwrap_or(LedState::Off);
        self.brightness = brightness.unwrap_or(100).min(100);
        let skip = done.len().saturating_sub(COMMANDS_DONE_KEPT);
        for reply in done.into_iter().skip(skip) {
            self.queue.remember_done(&reply);
            self.done.push_back(reply);
        }
        if let Some(newest) = self.done.back().cloned() {
            out.push(Effect::Reply {
                reply: newest,
                reboot_after: false,
            });
        }
    }

    pub fn led(&self) -> (LedState, u8) {
        (self.led, self.brightness)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A command arrived; `unix_now` in seconds once the shell has told the time.
    pub fn offer(
        &mut self,
        now: Millis,
        unix_now: Option<u64>,
        command: Command,
        out: &mut Vec<Effect>,
    ) {
        let id = command.id.clone();
        match self.queue.offer(command, unix_now) {
            Ok(()) => {
                self.reply(
                    CommandReply {
                        id,
                        status: CommandStatus::Accepted,
                        result: None,
                        error: None,
                    },
                    false,
                    out,
                );
                self.execute_at.get_or_insert(now);
            }
            Err(Refusal::Duplicate(Some(previous))) => self.reply(previous, false, out),
            Err(Refusal::Duplicate(None)) => {}
            Err(Refusal::Expired) => self.fail(id, "expired", out),
            Err(Refusal::QueueFull) => self.fail(id, "command queue full", out),
        }
    }

    /// A command that could not be parsed, but carries an id worth answering.
    pub fn malformed(&mut self, id: String, out: &mut Vec<Effect>) {
        self.fail(id, "malformed command", out);
    }

    pub fn next_timeout(&self) -> Option<Millis> {
        self.execute_at.into_iter().chain(self.reboot_at).min()
    }

    /// Runs the next command if one is due.
    pub fn execute_due(&mut self, now: Millis, unix_now: Option<u64>, out: &mut Vec<Effect>) {
        if self.execute_at.is_some_and(|t| t <= now) {
            self.execute_at = None;
            self.execute_next(now, unix_now, out);
        }
    }

    /// Restarts if a reboot's wait for its reply's acknowledgement ran out.
    pub fn reboot_due(&mut self, now: Millis, out: &mut Vec<Effect>) {
        if self.reboot_at.is_some_and(|t| t <= now) {
            self.reboot_at = None;
            out.push(Effect::Reboot);
        }
    }

    /// The reply a reboot waits for was acknowledged: restart now, unless the wait already
    /// ran out (and restarted the device).
    pub fn reboot_acknowledged(&mut self, out: &mut Vec<Effect>) {
        if self.reboot_at.take().is_some() {
            out.push(Effect::Reboot);
        }
    }

    fn fail(&mut self, id: String, error: &str, out: &mut Vec<Effect>) {
        let reply = CommandReply {
            id,
            status: CommandStatus::Failed,
            result: None,
            error: Some(error.to_string()),
        };
        self.reply(reply, false, out);
    }

    fn reply(&mut self, reply: CommandReply, reboot_after: bool, out: &mut Vec<Effect>) {
        if reply.status != CommandStatus::Accepted {
            self.queue.record_reply(&reply);
        }
        out.push(Effect::Reply {
            reply,
            reboot_after,
        });
    }

    /// Persists the final reply of a command that must not run twice, before it is sent.
    fn remember_done(&mut self, reply: &CommandReply, out: &mut Vec<Effect>) {
        if self.done.len() >= COMMANDS_DONE_KEPT {
            self.done.pop_front();
        }
        self.done.push_back(reply.clone());
        out.push(Effect::Persist(Persist::CommandsDone(
            self.done.iter().cloned().collect(),
        )));
    }

    fn execute_next(&mut self, now: Millis, unix_now: Option<u64>, out: &mut Vec<Effect>) {
        let Some(command) = self.queue.pop() else {
            return;
        };
        if unix_now.is_some_and(|s| s >= command.expires_at) {
            self.fail(command.id, "expired", out);
        } else {
            let parsed = DeviceCommand::of(&command);
            let reboot = parsed == Ok(DeviceCommand::Reboot);
            let outcome = parsed.map(|c| self.run(c, out));
            let reply = match outcome {
                Ok(result) => CommandReply {
                    id: command.id,
                    status: CommandStatus::Succeeded,
                    result: Some(result),
                    error: None,
                },
                Err(error) => CommandReply {
                    id: command.id,
                    status: CommandStatus::Failed,
                    result: None,
                    error: Some(error),
                },
            };
            if reboot {
                // Persisted first: a redelivery after the restart is answered, not run. The
                // restart waits for the reply's acknowledgement (or the deadline).
                self.remember_done(&reply, out);
                self.reboot_at = Some(now + self.reboot_wait_ms);
                self.reply(reply, true, out);
            } else {
                self.reply(reply, false, out);
            }
        }
        if !self.queue.is_empty() {
            self.execute_at = Some(now);
        }
    }

    fn run(&mut self, command: DeviceCommand, out: &mut Vec<Effect>) -> Value {
        match command {
            DeviceCommand::Led(state) => {
                self.set_led(state, self.brightness, out);
                json!({ "state": state.as_str() })
            }
            DeviceCommand::LedBrightness(value) => {
                self.set_led(self.led, value, out);
                json!({ "brightness": value })
            }
            DeviceCommand::Sensor { sensor, enabled } => {
                out.push(Effect::SetSensor { sensor, enabled });
                json!({ "sensor": sensor, "enabled": enabled })
            }
            DeviceCommand::Reboot => json!({ "rebooting": true }),
            DeviceCommand::Ping => json!({ "pong": true }),
        }
    }

    fn set_led(&mut self, state: LedState, brightness: u8, out: &mut Vec<Effect>) {
        self.led = state;
        self.brightness = brightness;
        out.push(Effect::SetLed { state, brightness });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use alloc::vec;

    fn command(id: &str, name: &str, args: Value) -> Command {
        Command {
            id: id.into(),
            name: name.into(),
            args,
            expires_at: 2_000_000_000,
        }
    }

    fn executor(queue: usize) -> Executor {
        Executor::new(&Config {
            command_queue: queue,
            reboot_wait_ms: 5_000,
            ..Config::default()
        })
    }

    /// The replies among `effects`, as (id, status).
    fn replies(effects: &[Effect]) -> Vec<(String, CommandStatus)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Reply { reply, .. } => Some((reply.id.clone(), reply.status)),
                _ => None,
            })
            .collect()
    }

    const NOW: Option<u64> = Some(1_900_000_000);

    #[test]
    fn commands_run_one_per_timeout_in_order_and_a_full_queue_refuses() {
        let mut ex = executor(2);
        let mut out = vec![];
        ex.offer(0, NOW, command("a", "ping", Value::Null), &mut out);
        ex.offer(
            0,
            NOW,
            command("b", "led", json!({"state": "ON"})),
            &mut out,
        );
        ex.offer(0, NOW, command("c", "ping", Value::Null), &mut out);
        assert_eq!(
            replies(&out),
            [
                ("a".into(), CommandStatus::Accepted),
                ("b".into(), CommandStatus::Accepted),
                ("c".into(), CommandStatus::Failed),
            ]
        );
        assert_eq!(ex.next_timeout(), Some(0));
        for (id, at) in [("a", 10), ("b", 20)] {
            out.clear();
            ex.execute_due(at, NOW, &mut out);
            assert_eq!(replies(&out), [(id.into(), CommandStatus::Succeeded)]);
        }
        assert!(out.contains(&Effect::SetLed {
            state: LedState::On,
            brightness: 100
        }));
        assert_eq!(
            (ex.led().0, ex.queued(), ex.next_timeout()),
            (LedState::On, 0, None)
        );
        // A redelivered id is answered with the reply it got, and not run again.
        out.clear();
        ex.offer(
            30,
            NOW,
            command("b", "led", json!({"state": "ON"})),
            &mut out,
        );
        assert_eq!(replies(&out), [("b".into(), CommandStatus::Succeeded)]);
        assert_eq!(ex.next_timeout(), None);
    }

    #[test]
    fn an_expired_or_malformed_command_fails_with_its_reason() {
        let mut ex = executor(4);
        let mut out = vec![];
        let mut old = command("old", "ping", Value::Null);
        old.expires_at = 1_000;
        ex.offer(0, NOW, old, &mut out);
        ex.malformed("bad".into(), &mut out);
        ex.offer(
            0,
            NOW,
            command("odd", "led", json!({"state": "purple"})),
            &mut out,
        );
        ex.execute_due(0, NOW, &mut out);
        let errors: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                Effect::Reply { reply, .. } if reply.status == CommandStatus::Failed => {
                    Some((reply.id.as_str(), reply.error.is_some()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(errors, [("old", true), ("bad", true), ("odd", true)]);
    }

    /// A reboot's id is persisted before its reply goes out, the restart waits for that
    /// reply's PUBACK (or the deadline), and after the restart the same id is answered, not run.
    #[test]
    fn a_reboot_is_persisted_first_waits_for_its_reply_and_never_runs_twice() {
        let mut ex = executor(4);
        let mut out = vec![];
        ex.offer(0, NOW, command("r", "reboot", Value::Null), &mut out);
        out.clear();
        ex.execute_due(0, NOW, &mut out);
        let [
            Effect::Persist(Persist::CommandsDone(done)),
            Effect::Reply {
                reply,
                reboot_after: true,
            },
        ] = &out[..]
        else {
            panic!("{out:?}");
        };
        assert_eq!((done.len(), reply.status), (1, CommandStatus::Succeeded));
        let done = done.clone();
        assert_eq!(ex.next_timeout(), Some(5_000));
        // The PUBACK arrives: restart now, once.
        out.clear();
        ex.reboot_acknowledged(&mut out);
        ex.reboot_acknowledged(&mut out);
        ex.reboot_due(10_000, &mut out);
        assert_eq!(out, [Effect::Reboot]);

        // After the restart, with what NVS kept: the reply is sent again, and the redelivered
        // command is answered from it.
        let mut after = executor(4);
        let mut out = vec![];
        after.boot(None, None, done, &mut out);
        assert_eq!(replies(&out), [("r".into(), CommandStatus::Succeeded)]);
        out.clear();
        after.offer(0, NOW, command("r", "reboot", Value::Null), &mut out);
        assert_eq!(replies(&out), [("r".into(), CommandStatus::Succeeded)]);
        after.execute_due(0, NOW, &mut out);
        assert!(!out.contains(&Effect::Reboot), "{out:?}");
        assert_eq!(after.next_timeout(), None);
    }

    /// The reply is never acknowledged (the link is down): the restart happens at the
    /// deadline, and a late PUBACK restarts nothing more.
    #[test]
    fn a_reboot_whose_reply_is_never_acknowledged_restarts_at_the_deadline() {
        let mut ex = executor(4);
        let mut out = vec![];
        ex.offer(0, NOW, command("r", "reboot", Value::Null), &mut out);
        ex.execute_due(100, NOW, &mut out);
        out.clear();
        ex.reboot_due(5_099, &mut out);
        assert!(out.is_empty());
        ex.reboot_due(5_100, &mut out);
        ex.reboot_acknowledged(&mut out);
        assert_eq!(out, [Effect::Reboot]);
    }

    #[test]
    fn only_the_newest_ids_are_kept_across_reboots() {
        let mut ex = executor(4);
        let reply = |i: usize| CommandReply {
            id: alloc::format!("r{i}"),
            status: CommandStatus::Succeeded,
            result: None,
            error: None,
        };
        let mut out = vec![];
        ex.boot(
            Some(LedState::On),
            Some(250),
            (0..COMMANDS_DONE_KEPT + 3).map(reply).collect(),
            &mut out,
        );
        assert_eq!(ex.led(), (LedState::On, 100), "brightness is capped");
        assert_eq!(ex.done.len(), COMMANDS_DONE_KEPT);
        assert_eq!(ex.done.front(), Some(&reply(3)));
        assert_eq!(
            replies(&out),
            [(
                alloc::format!("r{}", COMMANDS_DONE_KEPT + 2),
                CommandStatus::Succeeded
            )]
        );
    }
}
