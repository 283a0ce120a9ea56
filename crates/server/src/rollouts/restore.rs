//! Between a planner and its stored form: rollout and target states, the halt, and times —
//! stored wall-clock, planner monotonic ([`Clock`]), so a stepped wall clock moves no deadline.

use std::time::Instant;

use flotilla_rollout::{DeviceState, Forgiven, Halt, Metric, Snapshot, State};
use flotilla_store::{RolloutHalt, RolloutRow, RolloutState, TargetRow, TargetState, now_ms};

/// Planner time: milliseconds on a monotonic clock, starting at the wall clock's reading when
/// the server started (so it reads like a Unix time but never steps).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
    origin: u64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            started: Instant::now(),
            origin: now_ms().max(0) as u64,
        }
    }

    pub fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.origin.saturating_add(elapsed)
    }

    /// Wall clock minus planner clock now, in ms.
    pub fn wall_offset(&self) -> i64 {
        now_ms().saturating_sub(self.now() as i64)
    }

    pub fn wall_of(&self, t: u64) -> i64 {
        (t as i64).saturating_add(self.wall_offset())
    }

    pub fn planner_time_of(&self, wall: i64) -> u64 {
        wall.saturating_sub(self.wall_offset()).max(0) as u64
    }
}

pub fn rollout_state(s: State) -> RolloutState {
    match s {
        State::Scheduled => RolloutState::Scheduled,
        State::Running { .. } => RolloutState::Running,
        State::Paused { .. } => RolloutState::Paused,
        State::Stopped { .. } => RolloutState::Stopped,
        State::Aborted => RolloutState::Aborted,
        State::Completed => RolloutState::Completed,
    }
}

pub fn phase_of(s: State) -> Option<usize> {
    match s {
        State::Running { phase } | State::Paused { phase } | State::Stopped { phase } => {
            Some(phase)
        }
        _ => None,
    }
}

fn planner_state(row: &RolloutRow) -> State {
    let phase = row.phase.unwrap_or(0).max(0) as usize;
    match row.state {
        RolloutState::Scheduled => State::Scheduled,
        RolloutState::Running => State::Running { phase },
        RolloutState::Paused => State::Paused { phase },
        RolloutState::Stopped => State::Stopped { phase },
        RolloutState::Aborted => State::Aborted,
        RolloutState::Completed => State::Completed,
    }
}

pub fn stored_halt(h: Halt) -> RolloutHalt {
    match h {
        Halt::TooManyFailures => RolloutHalt::TooManyFailures,
        Halt::PhaseBelowSuccessThreshold => RolloutHalt::PhaseBelowSuccessThreshold,
        Halt::NoDeviceReached => RolloutHalt::NoDeviceReached,
        Halt::Unhealthy(Metric::Crashes) => RolloutHalt::UnhealthyCrashes,
        Halt::Unhealthy(Metric::Reboots) => RolloutHalt::UnhealthyReboots,
        Halt::Unhealthy(Metric::Heartbeats) => RolloutHalt::UnhealthyHeartbeats,
    }
}

fn planner_halt(h: RolloutHalt) -> Halt {
    match h {
        RolloutHalt::TooManyFailures => Halt::TooManyFailures,
        RolloutHalt::PhaseBelowSuccessThreshold => Halt::PhaseBelowSuccessThreshold,
        RolloutHalt::NoDeviceReached => Halt::NoDeviceReached,
        RolloutHalt::UnhealthyCrashes => Halt::Unhealthy(Metric::Crashes),
        RolloutHalt::UnhealthyReboots => Halt::Unhealthy(Metric::Reboots),
        RolloutHalt::UnhealthyHeartbeats => Halt::Unhealthy(Metric::Heartbeats),
    }
}

/// A target's planner state as stored: its state and, in flight, the wall time of the offer.
pub fn stored_target(d: DeviceState, clock: &Clock) -> (TargetState, Option<i64>) {
    match d {
        DeviceState::Waiting => (TargetState::Waiting, None),
        DeviceState::InFlight { since } => (TargetState::InFlight, Some(clock.wall_of(since))),
        DeviceState::Succeeded => (TargetState::Succeeded, None),
        DeviceState::Failed => (TargetState::Failed, None),
        DeviceState::TimedOut => (TargetState::TimedOut, None),
        DeviceState::Skipped => (TargetState::Skipped, None),
    }
}

fn planner_target(t: &TargetRow, clock: &Clock) -> DeviceState {
    match t.state {
        TargetState::Waiting => DeviceState::Waiting,
        // An offer without a time (not written by this server) counts from now.
        TargetState::InFlight => DeviceState::InFlight {
            since: t
                .since
                .map_or_else(|| clock.now(), |w| clock.planner_time_of(w)),
        },
        TargetState::Succeeded => DeviceState::Succeeded,
        TargetState::Failed => DeviceState::Failed,
        TargetState::TimedOut => DeviceState::TimedOut,
        TargetState::Skipped => DeviceState::Skipped,
    }
}

/// The planner snapshot a stored rollout and its targets (in target order) describe. A
/// rollout saved before waiting deadlines existed gets a full `wait_timeout_ms` from now.
pub fn snapshot(
    row: &RolloutRow,
    targets: &[TargetRow],
    clock: &Clock,
    wait_timeout_ms: u64,
) -> Snapshot {
    let state = planner_state(row);
    let wait_until = match row.wait_until {
        Some(w) => clock.planner_time_of(w),
        None if state == State::Scheduled => u64::MAX,
        None => clock.now().saturating_add(wait_timeout_ms),
    };
    Snapshot {
        state,
        halt: row.halt.map(planner_halt),
        devices: targets.iter().map(|t| planner_target(t, clock)).collect(),
        wait_until,
        forgiven: Forgiven {
            failed: row.forgiven_failed.max(0) as usize,
            succeeded: row.forgiven_succeeded.max(0) as usize,
            overrides: row.overrides.max(0) as usize,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planner_times_round_trip_through_the_wall_clock() {
        let clock = Clock::new();
        let t = clock.now();
        let back = clock.planner_time_of(clock.wall_of(t));
        // Two readings of the wall clock apart: within a few ms.
        assert!(back.abs_diff(t) < 50, "{t} -> {back}");
        let (state, since) = stored_target(DeviceState::InFlight { since: t }, &clock);
        assert_eq!(state, TargetState::InFlight);
        let row = TargetRow {
            position: 0,
            device_id: "d".into(),
            state,
            since,
        };
        match planner_target(&row, &clock) {
            DeviceState::InFlight { since } => assert!(since.abs_diff(t) < 50),
            other => panic!("{other:?}"),
        }
    }
}
