//! The staged rollout planner: which devices to offer a release to, and when to stop.
//!
//! Sans-IO like the device core: it reads no clock and sends nothing. Feed it what happened
//! (`handle_*`, each with `now` in milliseconds), drain [`Rollout::poll_action`], and call
//! [`Rollout::handle_timeout`] no later than [`Rollout::poll_timeout`]. The server drives it
//! and turns [`Action::Notify`] into an OTA offer on `devices/{id}/ota`.
//!
//! Rules: phases admit a growing share of the targets (e.g. 1% -> 10% -> 50% -> 100%); a device
//! is offered the release only while online and while fewer than `max_concurrent` are in
//! flight; a device succeeds only when it reports success, and a device that does not finish
//! within `device_timeout_ms` counts as failed. A phase advances once its devices have all
//! finished and the success share reaches `success_threshold`; the rollout stops itself as soon
//! as at least `min_failures` devices failed and the failure share of finished devices reaches
//! `failure_threshold`. Paused, stopped or aborted rollouts offer nothing more.
//!
//! ```
//! use flotilla_rollout::{Action, Config, Outcome, Rollout};
//!
//! let targets: Vec<String> = (0..100).map(|i| format!("dev-{i}")).collect();
//! let mut r = Rollout::new(Config::default(), targets, 0);
//! for id in r.targets().to_vec() {
//!     r.handle_online(0, &id);
//! }
//! let offered: Vec<String> = std::iter::from_fn(|| r.poll_action())
//!     .filter_map(|a| match a { Action::Notify(id) => Some(id), _ => None })
//!     .collect();
//! assert_eq!(offered.len(), 1); // phase 1: 1% of 100
//! r.handle_outcome(10, &offered[0], Outcome::Succeeded);
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Rollout parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Cumulative share of targets admitted by each phase, in percent, increasing, ending at 100.
    pub phases: Vec<f64>,
    /// Share of a phase's devices that must succeed before the next phase starts.
    pub success_threshold: f64,
    /// Share of finished devices that may fail before the rollout stops itself...
    pub failure_threshold: f64,
    /// ...once at least this many have failed.
    pub min_failures: usize,
    pub device_timeout_ms: u64,
    /// Most devices downloading and installing at once.
    pub max_concurrent: usize,
    /// Nothing is offered before this time.
    pub start_at_ms: u64,
    /// Offers are made only inside this daily window (devices already updating finish).
    pub window: Option<Window>,
}

const DAY_MS: u64 = 24 * 3600 * 1000;

/// A daily maintenance window in UTC, as milliseconds since midnight; it may wrap past
/// midnight (22:00-04:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Window {
    pub fn contains(&self, now: u64) -> bool {
        let t = now % DAY_MS;
        if self.start_ms <= self.end_ms {
            (self.start_ms..self.end_ms).contains(&t)
        } else {
            t >= self.start_ms || t < self.end_ms
        }
    }

    /// The first instant at or after `now` inside the window.
    pub fn next_open(&self, now: u64) -> u64 {
        if self.contains(now) {
            now
        } else {
            now + (self.start_ms % DAY_MS + DAY_MS - now % DAY_MS) % DAY_MS
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            phases: vec![1.0, 10.0, 50.0, 100.0],
            success_threshold: 0.95,
            failure_threshold: 0.2,
            min_failures: 1,
            device_timeout_ms: 30 * 60 * 1000,
            max_concurrent: 100,
            start_at_ms: 0,
            window: None,
        }
    }
}

/// How a device's update ended, as it reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Booted, confirmed and reconnected on the new version.
    Succeeded,
    Failed,
    RolledBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Waiting,
    InFlight { since: u64 },
    Succeeded,
    Failed,
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Scheduled,
    Running {
        phase: usize,
    },
    Paused {
        phase: usize,
    },
    /// Stopped by itself: too many failures.
    Stopped {
        phase: usize,
    },
    Aborted,
    Completed,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Offer the release to this device.
    Notify(String),
    /// The rollout changed state (audit it).
    Transition(State),
}

/// Per-state counts for progress reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub waiting: usize,
    pub in_flight: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub timed_out: usize,
}

#[derive(Debug)]
pub struct Rollout {
    config: Config,
    targets: Vec<String>,
    index: HashMap<String, usize>,
    devices: Vec<DeviceState>,
    online: Vec<bool>,
    state: State,
    /// Targets `[0, admitted)` belong to phases started so far.
    admitted: usize,
    in_flight: usize,
    /// Finished devices (all admitted): the thresholds read these instead of rescanning.
    succeeded: usize,
    failed: usize,
    /// Admitted, waiting and online: who may be offered next, lowest index first.
    ready: BTreeSet<usize>,
    /// `(offered at, index)` in offer order, for timeouts; entries of devices that have
    /// finished since are dropped lazily.
    deadlines: VecDeque<(u64, usize)>,
    /// The latest time an input carried, to tell when a closed window opens.
    last_now: u64,
    actions: VecDeque<Action>,
}

impl Rollout {
    pub fn new(config: Config, targets: Vec<String>, now: u64) -> Rollout {
        let index = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        let n = targets.len();
        let mut r = Rollout {
            config,
            targets,
            index,
            devices: vec![DeviceState::Waiting; n],
            online: vec![false; n],
            state: State::Scheduled,
            admitted: 0,
            in_flight: 0,
            succeeded: 0,
            failed: 0,
            ready: BTreeSet::new(),
            deadlines: VecDeque::new(),
            last_now: now,
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
            }
        }
        c
    }

    // ----- inputs -----

    pub fn handle_online(&mut self, now: u64, id: &str) {
        if let Some(&i) = self.index.get(id) {
            self.online[i] = true;
            if i < self.admitted && self.devices[i] == DeviceState::Waiting {
                self.ready.insert(i);
            }
            self.dispatch(now);
        }
    }

    pub fn handle_offline(&mut self, id: &str) {
        if let Some(&i) = self.index.get(id) {
            self.online[i] = false;
            self.ready.remove(&i);
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
        if outcome == Outcome::Succeeded {
            self.devices[i] = DeviceState::Succeeded;
            self.succeeded += 1;
        } else {
            self.devices[i] = DeviceState::Failed;
            self.failed += 1;
        }
        self.trim_deadlines();
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
        while let Some(&(since, i)) = self.deadlines.front() {
            if now.saturating_sub(since) < timeout {
                break;
            }
            self.deadlines.pop_front();
            if self.devices[i] == (DeviceState::InFlight { since }) {
                self.devices[i] = DeviceState::TimedOut;
                self.in_flight -= 1;
                self.failed += 1;
            }
        }
        self.trim_deadlines();
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
        // Offers are made in time order, so the oldest live entry is the next deadline.
        let deadline = self
            .deadlines
            .iter()
            .find(|(since, i)| self.devices[*i] == (DeviceState::InFlight { since: *since }))
            .map(|(since, _)| since + self.config.device_timeout_ms);
        // Devices waiting for the maintenance window: wake up when it opens.
        let opens = match self.config.window {
            Some(w)
                if matches!(self.state, State::Running { .. })
                    && !self.ready.is_empty()
                    && self.in_flight < self.config.max_concurrent =>
            {
                Some(w.next_open(self.last_now))
            }
            _ => None,
        };
        [deadline, opens].into_iter().flatten().min()
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
        let end = self.admitted.max(self.phase_end(phase));
        for i in self.admitted..end {
            if self.online[i] && self.devices[i] == DeviceState::Waiting {
                self.ready.insert(i);
            }
        }
        self.admitted = end;
        self.enter(State::Running { phase });
    }

    /// Drops deadline entries of devices that are no longer in flight from the front.
    fn trim_deadlines(&mut self) {
        while let Some(&(since, i)) = self.deadlines.front() {
            if self.devices[i] == (DeviceState::InFlight { since }) {
                break;
            }
            self.deadlines.pop_front();
        }
    }

    /// Applies the stop and advance rules, then offers the release to whom it may.
    fn evaluate(&mut self, now: u64) {
        let State::Running { phase } = self.state else {
            return;
        };
        let (failed, succeeded) = (self.failed, self.succeeded);
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
        }
        self.dispatch(now);
    }

    fn dispatch(&mut self, now: u64) {
        self.last_now = self.last_now.max(now);
        if !matches!(self.state, State::Running { .. })
            || self.config.window.is_some_and(|w| !w.contains(now))
        {
            return;
        }
        while self.in_flight < self.config.max_concurrent {
            let Some(i) = self.ready.pop_first() else {
                break;
            };
            self.devices[i] = DeviceState::InFlight { since: now };
            self.in_flight += 1;
            self.deadlines.push_back((now, i));
            self.actions
                .push_back(Action::Notify(self.targets[i].clone()));
        }
    }
}
