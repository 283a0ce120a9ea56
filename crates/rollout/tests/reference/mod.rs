//! The first, straightforward planner: it rescans every admitted device on each event
//! (O(n) per event). Kept as the oracle the indexed planner must agree with decision for
//! decision, and as the baseline of the planner benchmark.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};

use flotilla_rollout::{Action, Config, Counts, DeviceState, Outcome, State};

#[derive(Debug)]
pub struct Reference {
    config: Config,
    targets: Vec<String>,
    index: HashMap<String, usize>,
    devices: Vec<DeviceState>,
    online: Vec<bool>,
    state: State,
    /// Targets `[0, admitted)` belong to phases started so far.
    admitted: usize,
    in_flight: usize,
    actions: VecDeque<Action>,
}

impl Reference {
    pub fn new(config: Config, targets: Vec<String>, now: u64) -> Reference {
        let index = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        let n = targets.len();
        let mut r = Reference {
            config,
            targets,
            index,
            devices: vec![DeviceState::Waiting; n],
            online: vec![false; n],
            state: State::Scheduled,
            admitted: 0,
            in_flight: 0,
            actions: VecDeque::new(),
        };
        r.handle_timeout(now);
        r
    }

    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn device(&self, id: &str) -> Option<DeviceState> {
        self.index.get(id).map(|&i| self.devices[i])
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for d in &self.devices {
            match d {
                DeviceState::Waiting => c.waiting += 1,
                DeviceState::InFlight { .. } => c.in_flight += 1,
                DeviceState::Succeeded => c.succeeded += 1,
                DeviceState::Failed => c.failed += 1,
                DeviceState::TimedOut => c.timed_out += 1,
                DeviceState::Skipped => c.skipped += 1,
            }
        }
        c
    }

    // ----- inputs -----

    pub fn handle_online(&mut self, now: u64, id: &str) {
        if let Some(&i) = self.index.get(id) {
            self.online[i] = true;
            self.dispatch(now);
        }
    }

    pub fn handle_offline(&mut self, id: &str) {
        if let Some(&i) = self.index.get(id) {
            self.online[i] = false;
        }
    }

    /// A device reported how its update ended. Reports for devices never offered the release,
    /// or already finished, are ignored.
    pub fn handle_outcome(&mut self, now: u64, id: &str, outcome: Outcome) {
        let Some(&i) = self.index.get(id) else { return };
        if !matches!(self.devices[i], DeviceState::InFlight { .. }) {
            return;
        }
        self.in_flight -= 1;
        self.devices[i] = if outcome == Outcome::Succeeded {
            DeviceState::Succeeded
        } else {
            DeviceState::Failed
        };
        self.evaluate(now);
    }

    pub fn pause(&mut self) {
        if let State::Running { phase } = self.state {
            self.enter(State::Paused { phase });
        }
    }

    pub fn resume(&mut self, now: u64) {
        if let State::Paused { phase } = self.state {
            self.enter(State::Running { phase });
            self.evaluate(now);
        }
    }

    pub fn abort(&mut self) {
        if !matches!(self.state, State::Completed | State::Aborted) {
            self.enter(State::Aborted);
        }
    }

    pub fn handle_timeout(&mut self, now: u64) {
        if self.state == State::Scheduled && now >= self.config.start_at_ms {
            self.start_phase(0);
        }
        let timeout = self.config.device_timeout_ms;
        for d in self.devices.iter_mut() {
            if let DeviceState::InFlight { since } = *d
                && now.saturating_sub(since) >= timeout
            {
                *d = DeviceState::TimedOut;
                self.in_flight -= 1;
            }
        }
        self.evaluate(now);
    }

    // ----- outputs -----

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        if self.state == State::Scheduled {
            return Some(self.config.start_at_ms);
        }
        self.devices
            .iter()
            .filter_map(|d| match d {
                DeviceState::InFlight { since } => Some(since + self.config.device_timeout_ms),
                _ => None,
            })
            .min()
    }

    // ----- internals -----

    fn enter(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.actions.push_back(Action::Transition(state));
        }
    }

    fn phase_end(&self, phase: usize) -> usize {
        let n = self.targets.len();
        let pct = self
            .config
            .phases
            .get(phase)
            .copied()
            .unwrap_or(100.0)
            .clamp(0.0, 100.0);
        (((n as f64) * pct / 100.0).ceil() as usize).clamp(1.min(n), n)
    }

    fn start_phase(&mut self, phase: usize) {
        self.admitted = self.admitted.max(self.phase_end(phase));
        self.enter(State::Running { phase });
    }

    /// Applies the stop and advance rules, then offers the release to whom it may.
    fn evaluate(&mut self, now: u64) {
        let State::Running { phase } = self.state else {
            return;
        };
        let admitted = &self.devices[..self.admitted];
        let failed = admitted
            .iter()
            .filter(|d| matches!(d, DeviceState::Failed | DeviceState::TimedOut))
            .count();
        let succeeded = admitted
            .iter()
            .filter(|d| **d == DeviceState::Succeeded)
            .count();
        let finished = failed + succeeded;
        if failed >= self.config.min_failures.max(1)
            && failed as f64 >= self.config.failure_threshold * finished as f64
        {
            self.enter(State::Stopped { phase });
            return;
        }
        if finished == self.admitted {
            if (succeeded as f64) < self.config.success_threshold * self.admitted as f64 {
                self.enter(State::Stopped { phase });
                return;
            }
            if self.admitted == self.targets.len() {
                self.enter(State::Completed);
                return;
            }
            self.start_phase(phase + 1);
            // A phase that admits nobody new ends at once.
            self.evaluate(now);
            return;
        }
        self.dispatch(now);
    }

    fn dispatch(&mut self, now: u64) {
        if !matches!(self.state, State::Running { .. }) {
            return;
        }
        for i in 0..self.admitted {
            if self.in_flight >= self.config.max_concurrent {
                break;
            }
            if self.devices[i] == DeviceState::Waiting && self.online[i] {
                self.devices[i] = DeviceState::InFlight { since: now };
                self.in_flight += 1;
                self.actions
                    .push_back(Action::Notify(self.targets[i].clone()));
            }
        }
    }
}
