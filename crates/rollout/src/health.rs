//! The health gate: devices already on the new version against devices still on the old one,
//! over the same period, from what their heartbeats say — crashed boots (the heartbeat's
//! `crashes`, counted since the last clean start), reboots (its `uptime` going back) and the
//! heartbeats themselves. Rates are per device-hour: the old version's group holds targets that
//! wait (or were skipped), counted from their first heartbeat there (an offline device is not
//! observed); the new one's holds targets that succeeded, counted from the success (they were
//! online to report it), so a release whose devices fall silent right after lowers its
//! heartbeat rate. Devices updating, failed or timed out count for neither. A device's first
//! heartbeat in a group sets its baseline, so the update's own reboot is not counted. A device
//! is heard at most once per [`MIN_HEARD_GAP_MS`] and each time adds at most one crash, so one
//! that lies about its count, or beats as fast as the broker lets it, weighs no more than one
//! that crashes every five seconds (in a fleet of thousands, too little to hide a crashy
//! release; in a small first phase, enough to stop one, which is the safe side).
//!
//! Observation is in the planner's memory: a restored planner starts observing afresh, and an
//! operator's override of a halt starts it afresh too.

/// Thresholds; a `None` ratio leaves that measure unjudged (the default: no gate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthGate {
    /// Crashed boots per device-hour on the new version may be at most this multiple of the
    /// old version's.
    pub max_crash_ratio: Option<f64>,
    /// Reboots per device-hour, likewise.
    pub max_reboot_ratio: Option<f64>,
    /// Heartbeats per device-hour on the new version must reach this share of the old's.
    pub min_heartbeat_ratio: Option<f64>,
    /// Nothing is judged before the new version's devices have been heard for this much
    /// device-time in all (ms)...
    pub min_observed_ms: u64,
    /// ...nor a crash or reboot rate before the new version has this many of them, so one
    /// crash in a quiet fleet does not stop a rollout.
    pub min_events: u64,
}

impl Default for HealthGate {
    fn default() -> Self {
        HealthGate {
            max_crash_ratio: None,
            max_reboot_ratio: None,
            min_heartbeat_ratio: None,
            min_observed_ms: 3_600_000,
            min_events: 3,
        }
    }
}

impl HealthGate {
    pub fn is_enabled(&self) -> bool {
        self.max_crash_ratio.is_some()
            || self.max_reboot_ratio.is_some()
            || self.min_heartbeat_ratio.is_some()
    }
}

/// What the gate judged the new version worse at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Crashes,
    Reboots,
    /// Fewer heartbeats.
    Heartbeats,
}

/// The health facts of one heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub crashes: Option<u32>,
    pub uptime_s: Option<u64>,
}

/// Both groups' rates, per device-hour, as the gate last compared them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HealthFigures {
    pub new: Rates,
    pub old: Rates,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub devices: u64,
    pub device_hours: f64,
    pub crashes: f64,
    pub reboots: f64,
    pub heartbeats: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    Old = 0,
    New = 1,
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    members: u64,
    /// Sum of the live members' entry times.
    entered: u128,
    /// Device-time of members that left.
    closed_ms: u128,
    crashes: u64,
    reboots: u64,
    heartbeats: u64,
}

impl Tally {
    fn exposure_ms(&self, now: u64) -> u128 {
        (self.closed_ms + u128::from(self.members) * u128::from(now)).saturating_sub(self.entered)
    }

    fn rates(&self, now: u64) -> Rates {
        let hours = self.exposure_ms(now) as f64 / 3_600_000.0;
        let per_hour = |n: u64| if hours > 0.0 { n as f64 / hours } else { 0.0 };
        Rates {
            devices: self.members,
            device_hours: hours,
            crashes: per_hour(self.crashes),
            reboots: per_hour(self.reboots),
            heartbeats: per_hour(self.heartbeats),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Health {
    gate: HealthGate,
    groups: [Tally; 2],
    /// Per target: its group, and once it is observed there, since when and its last
    /// (crashes, uptime).
    member: Vec<Option<(Group, Option<Heard>)>>,
}

/// A device's heartbeats closer together than this count once.
pub const MIN_HEARD_GAP_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy)]
struct Heard {
    since: u64,
    /// `None` until its first heartbeat in the group; then when it was last heard and what
    /// it said (crashes, uptime).
    last: Option<(u64, u32, u64)>,
}

impl Tally {
    fn enter(&mut self, now: u64) -> Heard {
        self.members += 1;
        self.entered += u128::from(now);
        Heard {
            since: now,
            last: None,
        }
    }
}

impl Health {
    pub(crate) fn new(gate: HealthGate, targets: usize) -> Health {
        Health {
            gate,
            groups: [Tally::default(); 2],
            member: vec![None; targets],
        }
    }

    /// Target `i` moved to `group` (or out of both) at `now`.
    pub(crate) fn moved(&mut self, i: usize, group: Option<Group>, now: u64) {
        if self.member[i].map(|(g, _)| g) == group {
            return;
        }
        if let Some((g, Some(heard))) = self.member[i].take() {
            let t = &mut self.groups[g as usize];
            t.members -= 1;
            t.entered -= u128::from(heard.since);
            t.closed_ms += u128::from(now.saturating_sub(heard.since));
        }
        // The new version's targets are observed from their success on.
        let observed =
            (group == Some(Group::New)).then(|| self.groups[Group::New as usize].enter(now));
        self.member[i] = group.map(|g| (g, observed));
    }

    pub(crate) fn heartbeat(&mut self, i: usize, now: u64, sample: Sample) {
        let Some((g, heard)) = &mut self.member[i] else {
            return;
        };
        let t = &mut self.groups[*g as usize];
        let crashes = sample.crashes.unwrap_or(0);
        let uptime = sample.uptime_s.unwrap_or(u64::MAX);
        match heard {
            // An old-version target heard for the first time: observed from now.
            None => {
                let mut h = t.enter(now);
                h.last = Some((now, crashes, uptime));
                *heard = Some(h);
            }
            Some(h) => {
                if let Some((at, last_crashes, last_uptime)) = h.last {
                    if now < at.saturating_add(MIN_HEARD_GAP_MS) {
                        return;
                    }
                    t.crashes += u64::from(crashes > last_crashes);
                    if uptime < last_uptime {
                        t.reboots += 1;
                    }
                }
                t.heartbeats += 1;
                h.last = Some((now, crashes, uptime));
            }
        }
    }

    /// Starts observing afresh at `now` (an operator overrode a halt).
    pub(crate) fn forget(&mut self, now: u64) {
        let members: Vec<_> = self.member.iter().map(|m| m.map(|(g, _)| g)).collect();
        *self = Health::new(self.gate, members.len());
        for (i, g) in members.into_iter().enumerate() {
            self.moved(i, g, now);
        }
    }

    pub(crate) fn figures(&self, now: u64) -> HealthFigures {
        HealthFigures {
            new: self.groups[Group::New as usize].rates(now),
            old: self.groups[Group::Old as usize].rates(now),
        }
    }

    /// Whether the new version's devices have been heard for the device-time the gate
    /// needs to judge.
    pub(crate) fn has_seen_enough(&self, now: u64) -> bool {
        self.groups[Group::New as usize].exposure_ms(now)
            >= u128::from(self.gate.min_observed_ms.max(1))
    }

    /// What the new version is worse at, if the gate says so now.
    pub(crate) fn verdict(&self, now: u64) -> Option<Metric> {
        if !self.gate.is_enabled() {
            return None;
        }
        let (new, old) = (
            &self.groups[Group::New as usize],
            &self.groups[Group::Old as usize],
        );
        if !self.has_seen_enough(now) || old.exposure_ms(now) == 0 {
            return None;
        }
        let f = self.figures(now);
        let worse = |ratio: Option<f64>, events: u64, new_rate: f64, old_rate: f64| {
            ratio.is_some_and(|r| events >= self.gate.min_events && new_rate > r * old_rate)
        };
        if worse(
            self.gate.max_crash_ratio,
            new.crashes,
            f.new.crashes,
            f.old.crashes,
        ) {
            return Some(Metric::Crashes);
        }
        if worse(
            self.gate.max_reboot_ratio,
            new.reboots,
            f.new.reboots,
            f.old.reboots,
        ) {
            return Some(Metric::Reboots);
        }
        let fewer = self.gate.min_heartbeat_ratio.is_some_and(|r| {
            old.heartbeats >= self.gate.min_events && f.new.heartbeats < r * f.old.heartbeats
        });
        fewer.then_some(Metric::Heartbeats)
    }
}
