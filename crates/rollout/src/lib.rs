//! The staged rollout planner: which devices to offer a release to, and when to stop.
//!
//! Sans-IO like the device core: it reads no clock and sends nothing. Feed it what happened
//! (`handle_*`, each with `now`), drain [`Rollout::poll_action`] and [`Rollout::take_changes`],
//! and call [`Rollout::handle_timeout`] no later than [`Rollout::poll_timeout`]. The server
//! drives it, turns [`Action::Notify`] into an OTA offer on `devices/{id}/ota` and stores each
//! target's state, from which [`Rollout::restore`] rebuilds the planner after a restart.
//!
//! Time: `now` is a monotonic count of milliseconds (it never steps); only the start time and
//! the maintenance window are wall-clock, read through [`Rollout::set_wall_offset`].
//!
//! Rules: phases admit a growing share of the targets (e.g. 1% -> 10% -> 50% -> 100%); a device
//! is offered the release only while online and while fewer than `max_concurrent` are in
//! flight; a device succeeds only when it reports success, and a device that does not finish
//! within `device_timeout_ms` counts as failed. A target still offline `wait_timeout_ms` after
//! its phase started is skipped: finished, neither success nor failure, and offered after all
//! if it comes online while the rollout runs. A phase advances once its devices have all
//! finished (or were skipped) and successes reach `success_threshold` of the devices that were
//! not skipped; the rollout halts — stops, or pauses with [`OnFailure::Pause`] — as soon as at
//! least `min_failures` devices failed and the failure share of finished devices reaches
//! `failure_threshold`. Resuming a halted rollout is an operator's override: the failures so
//! far are forgiven and the rules count from there. Paused, stopped or aborted rollouts offer
//! nothing more.
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

mod health;

use health::{Group, Health};
pub use health::{HealthFigures, HealthGate, MIN_HEARD_GAP_MS, Metric, Rates, Sample};

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
    /// How long after its phase started a target may stay offline before it is skipped.
    pub wait_timeout_ms: u64,
    /// What crossing `failure_threshold` does.
    pub on_failure: OnFailure,
    /// Most devices downloading and installing at once.
    pub max_concurrent: usize,
    /// Nothing is offered before this wall-clock time (Unix ms).
    pub start_at_ms: u64,
    /// Offers are made only inside this daily window (devices already updating finish).
    pub window: Option<Window>,
    /// Halts when the new version's devices crash or reboot more, or heartbeat less, than
    /// the old version's ([`HealthGate`]); off by default.
    pub health: HealthGate,
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
            wait_timeout_ms: 3600 * 1000,
            on_failure: OnFailure::Stop,
            max_concurrent: 100,
            start_at_ms: 0,
            window: None,
            health: HealthGate::default(),
        }
    }
}

/// What a rollout does when too many of its devices fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    #[default]
    Stop,
    Pause,
}

/// Why a rollout halted itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// At least `min_failures` failed and their share reached `failure_threshold`.
    TooManyFailures,
    /// A phase ended with fewer successes than `success_threshold` asks.
    PhaseBelowSuccessThreshold,
    /// A phase ended with every device skipped and no success so far: nothing shows the
    /// release works.
    NoDeviceReached,
    /// The health gate found the new version worse at this ([`Rollout::health`] has the rates).
    Unhealthy(Metric),
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
    InFlight {
        since: u64,
    },
    Succeeded,
    Failed,
    TimedOut,
    /// Offline past the waiting deadline: not offered (yet).
    Skipped,
}

impl DeviceState {
    /// Finished for the phase rules (skipped included).
    pub fn is_finished(self) -> bool {
        !matches!(self, DeviceState::Waiting | DeviceState::InFlight { .. })
    }
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
    /// Stopped by itself ([`Rollout::halt`] says why).
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
    pub skipped: usize,
}

/// Failures and successes an operator's override accepted: the halt rules count past them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forgiven {
    pub failed: usize,
    pub succeeded: usize,
    /// How many times an operator overrode a halt.
    pub overrides: usize,
}

/// What [`Rollout::restore`] needs to rebuild a planner where it was: everything else follows
/// from these and the configuration. Times are planner (monotonic) times.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub state: State,
    pub halt: Option<Halt>,
    /// Each target's state, in target order.
    pub devices: Vec<DeviceState>,
    /// When waiting targets of the current phase are skipped.
    pub wait_until: u64,
    pub forgiven: Forgiven,
}

#[derive(Debug)]
pub struct Rollout {
    config: Config,
    targets: Vec<String>,
    index: HashMap<String, usize>,
    devices: Vec<DeviceState>,
    online: Vec<bool>,
    state: State,
    halt: Option<Halt>,
    /// Targets `[0, admitted)` belong to phases started so far.
    admitted: usize,
    /// Running counts, so the rules read these instead of rescanning.
    in_flight: usize,
    succeeded: usize,
    failed: usize,
    skipped: usize,
    /// Admitted targets in the waiting state.
    waiting: usize,
    forgiven: Forgiven,
    /// When waiting targets of the current phase that are offline are skipped; once passed
    /// (`wait_expired`), a waiting target that goes offline is skipped at once.
    wait_until: u64,
    wait_expired: bool,
    /// Admitted, online, waiting or skipped: who may be offered next, lowest index first.
    ready: BTreeSet<usize>,
    /// `(offered at, index)` in offer order, for timeouts; entries of devices that have
    /// finished since are dropped lazily.
    deadlines: VecDeque<(u64, usize)>,
    /// The latest time an input carried, to tell when a closed window opens.
    last_now: u64,
    /// Wall clock minus planner clock, in ms.
    wall_offset: i64,
    actions: VecDeque<Action>,
    /// Targets whose state changed since [`Rollout::take_changes`].
    changed: BTreeSet<usize>,
    health: Health,
    /// With the health gate on: when the current phase's devices had all finished, while the
    /// phase waits for the gate to have seen enough before the next one starts.
    finished_at: Option<u64>,
}

impl Rollout {
    pub fn new(config: Config, targets: Vec<String>, now: u64) -> Rollout {
        let n = targets.len();
        let mut r = Rollout::empty(config, targets, vec![DeviceState::Waiting; n], now);
        r.handle_timeout(now);
        r
    }

    /// Rebuilds a planner from what was stored of it, emitting nothing for what already
    /// happened: no transition, no offer. Feed it who is online afterwards.
    pub fn restore(
        config: Config,
        targets: Vec<String>,
        snapshot: Snapshot,
        now: u64,
    ) -> Result<Rollout, String> {
        if snapshot.devices.len() != targets.len() {
            return Err(format!(
                "{} target states for {} targets",
                snapshot.devices.len(),
                targets.len()
            ));
        }
        let mut r = Rollout::empty(config, targets, snapshot.devices, now);
        r.state = snapshot.state;
        r.halt = snapshot.halt;
        r.forgiven = snapshot.forgiven;
        r.wait_until = snapshot.wait_until;
        // Checked again at the next timeout: offline targets may be skipped now.
        r.wait_expired = false;
        r.admitted = match snapshot.state {
            State::Scheduled => 0,
            State::Running { phase } | State::Paused { phase } | State::Stopped { phase } => {
                r.phase_end(phase)
            }
            State::Aborted | State::Completed => r.targets.len(),
        };
        if let Some(i) =
            (r.admitted..r.targets.len()).find(|&i| r.devices[i] != DeviceState::Waiting)
        {
            return Err(format!("target {} is past its phase", r.targets[i]));
        }
        let mut in_flight: Vec<(u64, usize)> = Vec::new();
        for (i, d) in r.devices.iter().enumerate() {
            match *d {
                DeviceState::Waiting if i < r.admitted => r.waiting += 1,
                DeviceState::Waiting => {}
                DeviceState::InFlight { since } => in_flight.push((since, i)),
                DeviceState::Succeeded => r.succeeded += 1,
                DeviceState::Failed | DeviceState::TimedOut => r.failed += 1,
                DeviceState::Skipped => r.skipped += 1,
            }
        }
        if r.forgiven.failed > r.failed || r.forgiven.succeeded > r.succeeded {
            return Err("more failures or successes forgiven than there are".into());
        }
        // An offer dated in the future (a clock that stepped back) counts from now.
        for (since, i) in &mut in_flight {
            *since = (*since).min(now);
            r.devices[*i] = DeviceState::InFlight { since: *since };
        }
        in_flight.sort_unstable();
        r.in_flight = in_flight.len();
        r.deadlines = in_flight.into();
        Ok(r)
    }

    fn empty(config: Config, targets: Vec<String>, devices: Vec<DeviceState>, now: u64) -> Rollout {
        let index = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i))
            .collect();
        let n = targets.len();
        let mut health = Health::new(config.health, n);
        for (i, d) in devices.iter().enumerate() {
            health.moved(i, group_of(*d), now);
        }
        Rollout {
            health,
            finished_at: None,
            config,
            targets,
            index,
            devices,
            online: vec![false; n],
            state: State::Scheduled,
            halt: None,
            admitted: 0,
            in_flight: 0,
            succeeded: 0,
            failed: 0,
            skipped: 0,
            waiting: 0,
            forgiven: Forgiven::default(),
            wait_until: u64::MAX,
            wait_expired: false,
            ready: BTreeSet::new(),
            deadlines: VecDeque::new(),
            last_now: now,
            wall_offset: 0,
            actions: VecDeque::new(),
            changed: BTreeSet::new(),
        }
    }

    /// What is needed to [`Rollout::restore`] this planner.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.state,
            halt: self.halt,
            devices: self.devices.clone(),
            wait_until: self.wait_until,
            forgiven: self.forgiven,
        }
    }

    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Why the rollout halted itself, while it is stopped or paused by that.
    pub fn halt(&self) -> Option<Halt> {
        self.halt
    }

    pub fn forgiven(&self) -> Forgiven {
        self.forgiven
    }

    /// When the current phase's offline targets are skipped (planner time).
    pub fn wait_until(&self) -> u64 {
        self.wait_until
    }

    pub fn device(&self, id: &str) -> Option<DeviceState> {
        self.index.get(id).map(|&i| self.devices[i])
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            waiting: self.devices.len()
                - self.in_flight
                - self.succeeded
                - self.failed
                - self.skipped,
            in_flight: self.in_flight,
            succeeded: self.succeeded,
            skipped: self.skipped,
            ..Counts::default()
        };
        for d in &self.devices {
            match d {
                DeviceState::Failed => c.failed += 1,
                DeviceState::TimedOut => c.timed_out += 1,
                _ => {}
            }
        }
        c
    }

    /// Sets wall clock minus planner clock (ms), which the start time and the maintenance
    /// window are read through. The driver updates it as the wall clock steps.
    pub fn set_wall_offset(&mut self, offset: i64) {
        self.wall_offset = offset;
    }

    /// Targets whose state changed since the last call: `(index in targets, state now)`.
    pub fn take_changes(&mut self) -> Vec<(usize, DeviceState)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|i| (i, self.devices[i]))
            .collect()
    }

    // ----- inputs -----

    pub fn handle_online(&mut self, now: u64, id: &str) {
        self.tick(now);
        if let Some(&i) = self.index.get(id) {
            self.online[i] = true;
            if i < self.admitted
                && matches!(self.devices[i], DeviceState::Waiting | DeviceState::Skipped)
            {
                self.ready.insert(i);
            }
            self.dispatch(now);
        }
    }

    pub fn handle_offline(&mut self, now: u64, id: &str) {
        self.tick(now);
        if let Some(&i) = self.index.get(id) {
            self.online[i] = false;
            self.ready.remove(&i);
            if self.wait_expired
                && matches!(self.state, State::Running { .. })
                && i < self.admitted
                && self.devices[i] == DeviceState::Waiting
            {
                self.skip(i);
                self.evaluate(now);
            }
        }
    }

    /// A device reported how its update ended. Reports for devices never offered the release,
    /// or already finished, are ignored.
    pub fn handle_outcome(&mut self, now: u64, id: &str, outcome: Outcome) {
        self.tick(now);
        let Some(&i) = self.index.get(id) else { return };
        if !matches!(self.devices[i], DeviceState::InFlight { .. }) {
            return;
        }
        self.in_flight -= 1;
        if outcome == Outcome::Succeeded {
            self.set(i, DeviceState::Succeeded);
            self.succeeded += 1;
        } else {
            self.set(i, DeviceState::Failed);
            self.failed += 1;
        }
        self.trim_deadlines();
        self.evaluate(now);
    }

    /// The offer could not be made (the device is busy with another update): the target waits
    /// again, as if offline until it is next seen online — or is skipped, once the waiting
    /// deadline has passed.
    pub fn handle_offer_refused(&mut self, now: u64, id: &str) {
        self.tick(now);
        let Some(&i) = self.index.get(id) else { return };
        if !matches!(self.devices[i], DeviceState::InFlight { .. }) {
            return;
        }
        self.in_flight -= 1;
        self.online[i] = false;
        if self.wait_expired {
            // Past the waiting deadline a device that cannot take the release now is skipped
            // (and tried again when it is next seen online while the rollout runs).
            self.set(i, DeviceState::Skipped);
            self.skipped += 1;
        } else {
            self.set(i, DeviceState::Waiting);
            self.waiting += 1;
        }
        self.trim_deadlines();
        self.evaluate(now);
    }

    /// An offer decided but not made after all (the rollout halted or was paused before it
    /// was sent): the target waits again.
    pub fn handle_offer_withdrawn(&mut self, id: &str) {
        let Some(&i) = self.index.get(id) else { return };
        if !matches!(self.devices[i], DeviceState::InFlight { .. }) {
            return;
        }
        self.in_flight -= 1;
        self.set(i, DeviceState::Waiting);
        self.waiting += 1;
        if self.online[i] {
            self.ready.insert(i);
        }
        self.trim_deadlines();
    }

    /// A heartbeat of a target, for the health gate: its crash count and uptime.
    pub fn handle_heartbeat(&mut self, now: u64, id: &str, sample: Sample) {
        self.tick(now);
        let Some(&i) = self.index.get(id) else { return };
        self.health.heartbeat(i, now, sample);
        if self.config.health.is_enabled() {
            self.evaluate(now);
        }
    }

    /// The rates the health gate compares, per device-hour, as of `now`.
    pub fn health(&self, now: u64) -> HealthFigures {
        self.health.figures(now)
    }

    pub fn pause(&mut self) {
        if let State::Running { phase } = self.state {
            self.enter(State::Paused { phase });
        }
    }

    /// Resumes a paused rollout; resuming one that halted itself (stopped, or paused by
    /// [`OnFailure::Pause`]) overrides the halt: the failures so far are forgiven.
    pub fn resume(&mut self, now: u64) {
        if let State::Paused { phase } | State::Stopped { phase } = self.state {
            self.tick(now);
            if self.halt.take().is_some() {
                self.health.forget(now);
                self.forgiven = Forgiven {
                    failed: self.failed,
                    succeeded: self.succeeded,
                    overrides: self.forgiven.overrides + 1,
                };
            }
            // Time spent paused does not count against offline targets.
            self.wait_until = self
                .wait_until
                .max(now.saturating_add(self.config.wait_timeout_ms));
            self.wait_expired = false;
            self.enter(State::Running { phase });
            self.evaluate(now);
        }
    }

    pub fn abort(&mut self) {
        if !matches!(self.state, State::Completed | State::Aborted) {
            self.halt = None;
            self.enter(State::Aborted);
        }
    }

    pub fn handle_timeout(&mut self, now: u64) {
        self.tick(now);
        if self.state == State::Scheduled && self.wall(now) >= self.config.start_at_ms {
            self.start_phase(0, now);
        }
        let timeout = self.config.device_timeout_ms;
        while let Some(&(since, i)) = self.deadlines.front() {
            if now.saturating_sub(since) < timeout {
                break;
            }
            self.deadlines.pop_front();
            if self.devices[i] == (DeviceState::InFlight { since }) {
                self.set(i, DeviceState::TimedOut);
                self.in_flight -= 1;
                self.failed += 1;
            }
        }
        self.trim_deadlines();
        if matches!(self.state, State::Running { .. })
            && !self.wait_expired
            && now >= self.wait_until
            && let Some(w) = self.config.window.filter(|w| {
                // Closed for the whole wait: nobody could have been offered it, wait on.
                let began = self.wait_until.saturating_sub(self.config.wait_timeout_ms);
                w.next_open(self.wall(began)) > self.wall(now)
            })
        {
            self.wait_until = self
                .mono(w.next_open(self.wall(now)))
                .saturating_add(self.config.wait_timeout_ms);
        }
        if matches!(self.state, State::Running { .. })
            && !self.wait_expired
            && now >= self.wait_until
        {
            self.wait_expired = true;
            for i in 0..self.admitted {
                if self.devices[i] == DeviceState::Waiting && !self.online[i] {
                    self.skip(i);
                }
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
            return Some(self.mono(self.config.start_at_ms));
        }
        // Offers are made in time order, so the oldest live entry is the next deadline.
        let deadline = self
            .deadlines
            .iter()
            .find(|(since, i)| self.devices[*i] == (DeviceState::InFlight { since: *since }))
            .map(|(since, _)| since.saturating_add(self.config.device_timeout_ms));
        let running = matches!(self.state, State::Running { .. });
        let skip =
            (running && !self.wait_expired && self.waiting > 0 && self.wait_until < u64::MAX)
                .then_some(self.wait_until);
        // Devices waiting for the maintenance window: wake up when it opens.
        let opens = match self.config.window {
            Some(w)
                if running
                    && !self.ready.is_empty()
                    && self.in_flight < self.config.max_concurrent =>
            {
                Some(self.mono(w.next_open(self.wall(self.last_now))))
            }
            _ => None,
        };
        let held = self
            .finished_at
            .filter(|_| running)
            .map(|since| since.saturating_add(self.config.wait_timeout_ms));
        [deadline, skip, opens, held].into_iter().flatten().min()
    }

    // ----- internals -----

    fn wall(&self, now: u64) -> u64 {
        (now as i64).saturating_add(self.wall_offset).max(0) as u64
    }

    fn mono(&self, wall: u64) -> u64 {
        (wall as i64).saturating_sub(self.wall_offset).max(0) as u64
    }

    fn tick(&mut self, now: u64) {
        self.last_now = self.last_now.max(now);
    }

    fn set(&mut self, i: usize, state: DeviceState) {
        if self.devices[i] == DeviceState::Waiting && i < self.admitted {
            self.waiting -= 1;
        }
        self.health.moved(i, group_of(state), self.last_now);
        self.devices[i] = state;
        self.changed.insert(i);
    }

    fn skip(&mut self, i: usize) {
        self.set(i, DeviceState::Skipped);
        self.skipped += 1;
    }

    fn enter(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.actions.push_back(Action::Transition(state));
        }
    }

    fn halt_with(&mut self, phase: usize, why: Halt) {
        self.halt = Some(why);
        match (why, self.config.on_failure) {
            (Halt::TooManyFailures | Halt::Unhealthy(_), OnFailure::Pause) => {
                self.enter(State::Paused { phase })
            }
            _ => self.enter(State::Stopped { phase }),
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

    fn start_phase(&mut self, phase: usize, now: u64) {
        let end = self.admitted.max(self.phase_end(phase));
        for i in self.admitted..end {
            if self.devices[i] == DeviceState::Waiting {
                self.waiting += 1;
                if self.online[i] {
                    self.ready.insert(i);
                }
            }
        }
        self.admitted = end;
        self.finished_at = None;
        self.wait_until = now.saturating_add(self.config.wait_timeout_ms);
        self.wait_expired = false;
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

    /// Applies the halt and advance rules, then offers the release to whom it may.
    fn evaluate(&mut self, now: u64) {
        let State::Running { phase } = self.state else {
            return;
        };
        let failed = self.failed.saturating_sub(self.forgiven.failed);
        let succeeded = self.succeeded.saturating_sub(self.forgiven.succeeded);
        if failed >= self.config.min_failures.max(1)
            && failed as f64 >= self.config.failure_threshold * (failed + succeeded) as f64
        {
            self.halt_with(phase, Halt::TooManyFailures);
            return;
        }
        if let Some(metric) = self.health.verdict(now) {
            self.halt_with(phase, Halt::Unhealthy(metric));
            return;
        }
        // Skipped devices that came back are offered (window permitting) before the phase can
        // end without them.
        self.dispatch(now);
        let finished = self.succeeded + self.failed + self.skipped;
        if finished == self.admitted && !self.gate_has_seen_enough(now) {
            return;
        }
        if finished == self.admitted {
            let counted = self
                .admitted
                .saturating_sub(self.skipped + self.forgiven.failed);
            if (self.succeeded as f64) < self.config.success_threshold * counted as f64 {
                self.halt_with(phase, Halt::PhaseBelowSuccessThreshold);
                return;
            }
            if self.succeeded == 0 && counted == 0 && self.forgiven.overrides == 0 {
                self.halt_with(phase, Halt::NoDeviceReached);
                return;
            }
            if self.admitted == self.targets.len() {
                self.enter(State::Completed);
                return;
            }
            self.start_phase(phase + 1, now);
            // A phase that admits nobody new (a small fleet) ends at once.
            self.evaluate(now);
        }
    }

    /// With the gate on, a finished phase holds the next one back until the gate has seen
    /// `min_observed_ms` of the new version, or for at most `wait_timeout_ms` (so it ends).
    fn gate_has_seen_enough(&mut self, now: u64) -> bool {
        if !self.config.health.is_enabled() || self.admitted == self.targets.len() {
            return true;
        }
        let since = *self.finished_at.get_or_insert(now);
        self.health.has_seen_enough(now) || now.saturating_sub(since) >= self.config.wait_timeout_ms
    }

    fn dispatch(&mut self, now: u64) {
        self.last_now = self.last_now.max(now);
        if !matches!(self.state, State::Running { .. })
            || self
                .config
                .window
                .is_some_and(|w| !w.contains(self.wall(now)))
        {
            return;
        }
        while self.in_flight < self.config.max_concurrent {
            let Some(i) = self.ready.pop_first() else {
                break;
            };
            if self.devices[i] == DeviceState::Skipped {
                self.skipped -= 1;
            }
            self.set(i, DeviceState::InFlight { since: now });
            self.in_flight += 1;
            self.deadlines.push_back((now, i));
            self.actions
                .push_back(Action::Notify(self.targets[i].clone()));
        }
    }
}

/// Which version a target in `state` runs, for the health gate; `None` while it updates or
/// after it failed.
fn group_of(state: DeviceState) -> Option<Group> {
    match state {
        DeviceState::Waiting | DeviceState::Skipped => Some(Group::Old),
        DeviceState::Succeeded => Some(Group::New),
        _ => None,
    }
}
