//! The health gate in simulated time: 10,000 devices heartbeating every five minutes, the new
//! version's devices crashing (or falling silent) more than the old version's over the same
//! period. A crashy release stops in its first phase with the reason; a release as healthy as
//! the old one completes (its own update reboots are not counted); an override starts the
//! observation afresh.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_rollout::{Action, Config, Halt, HealthGate, Metric, Outcome, Rollout, Sample, State};

const FLEET: usize = 10_000;
const MIN: u64 = 60_000;
const STEP: u64 = 5 * MIN;

/// How a version behaves on a device: minutes between crashes, and whether it heartbeats.
#[derive(Clone, Copy)]
struct Behaviour {
    crash_every_min: u64,
    heartbeats: bool,
}

const OLD: Behaviour = Behaviour {
    crash_every_min: 50 * 60,
    heartbeats: true,
};

/// As healthy as the old version, but never heartbeating.
const SILENT: Behaviour = Behaviour {
    heartbeats: false,
    ..OLD
};

struct Device {
    new: bool,
    uptime_s: u64,
    crashes: u32,
    since_crash_min: u64,
}

struct Sim {
    r: Rollout,
    devices: Vec<Device>,
    ids: Vec<String>,
    new: Behaviour,
    now: u64,
    /// Offered at this step, succeed at the next.
    updating: Vec<usize>,
}

impl Sim {
    fn new(config: Config, new: Behaviour) -> Sim {
        let ids: Vec<String> = (0..FLEET).map(|i| format!("dev-{i:05}")).collect();
        let mut r = Rollout::new(config, ids.clone(), 0);
        for id in &ids {
            r.handle_online(0, id);
        }
        let devices = (0..FLEET)
            .map(|i| Device {
                new: false,
                uptime_s: 3_600 + i as u64,
                crashes: 0,
                // Spread the old version's crashes over its interval.
                since_crash_min: (i as u64 * 7) % OLD.crash_every_min,
            })
            .collect();
        let mut sim = Sim {
            r,
            devices,
            ids,
            new,
            now: 0,
            updating: Vec::new(),
        };
        sim.drain();
        sim
    }

    fn drain(&mut self) {
        while let Some(a) = self.r.poll_action() {
            if let Action::Notify(id) = a {
                let i = self.ids.iter().position(|x| *x == id).unwrap();
                self.updating.push(i);
            }
        }
    }

    fn step(&mut self) {
        self.now += STEP;
        for i in std::mem::take(&mut self.updating) {
            let d = &mut self.devices[i];
            // The update's own reboot: a clean start on the new version.
            (d.new, d.uptime_s, d.crashes, d.since_crash_min) = (true, 0, 0, (i as u64 * 7) % 60);
            self.r
                .handle_outcome(self.now, &self.ids[i], Outcome::Succeeded);
        }
        for i in 0..FLEET {
            let behaviour = if self.devices[i].new { self.new } else { OLD };
            let d = &mut self.devices[i];
            d.uptime_s += STEP / 1000;
            d.since_crash_min += STEP / MIN;
            if d.since_crash_min >= behaviour.crash_every_min {
                (d.crashes, d.uptime_s, d.since_crash_min) = (d.crashes + 1, 0, 0);
            }
            if behaviour.heartbeats {
                let sample = Sample {
                    crashes: Some(d.crashes),
                    uptime_s: Some(d.uptime_s),
                };
                self.r.handle_heartbeat(self.now, &self.ids[i], sample);
            }
        }
        self.r.handle_timeout(self.now);
        self.drain();
    }

    /// Steps until the rollout is no longer running or `hours` pass.
    fn run_for(&mut self, hours: u64) {
        let end = self.now + hours * 60 * MIN;
        while self.now < end && matches!(self.r.state(), State::Running { .. }) {
            self.step();
        }
    }
}

fn config(gate: HealthGate) -> Config {
    Config {
        phases: vec![1.0, 10.0, 100.0],
        max_concurrent: 500,
        health: gate,
        ..Config::default()
    }
}

/// Every measure, with heartbeats judged.
fn heartbeat_gate() -> HealthGate {
    HealthGate {
        min_heartbeat_ratio: Some(0.5),
        ..every_measure()
    }
}

fn every_measure() -> HealthGate {
    HealthGate {
        max_crash_ratio: Some(2.0),
        max_reboot_ratio: Some(2.0),
        min_heartbeat_ratio: Some(0.5),
        min_observed_ms: 20 * 60 * MIN,
        min_events: 3,
    }
}

#[test]
fn a_release_whose_devices_crash_more_stops_in_its_first_phase_with_the_reason() {
    let crashy = Behaviour {
        crash_every_min: 30,
        heartbeats: true,
    };
    let mut sim = Sim::new(config(every_measure()), crashy);
    sim.run_for(48);
    assert_eq!(sim.r.state(), State::Stopped { phase: 0 });
    assert!(
        matches!(
            sim.r.halt(),
            Some(Halt::Unhealthy(Metric::Crashes | Metric::Reboots))
        ),
        "{:?}",
        sim.r.halt()
    );
    assert!(sim.now <= 6 * 60 * MIN, "it took {} min", sim.now / MIN);
    let f = sim.r.health(sim.now);
    assert!(f.new.crashes > 2.0 * f.old.crashes, "{f:?}");
    assert_eq!(f.new.devices, 100, "{f:?}");
    assert_eq!(sim.r.counts().succeeded, 100);

    // An operator's override starts observing afresh: running again, not stopped at once.
    sim.r.resume(sim.now);
    assert!(matches!(sim.r.state(), State::Running { .. }));
    assert_eq!(sim.r.health(sim.now).new.device_hours, 0.0);
}

#[test]
fn a_release_whose_devices_fall_silent_stops_on_heartbeats() {
    let (silent, gate) = (SILENT, heartbeat_gate());
    let mut sim = Sim::new(config(gate), silent);
    // Beats twice after its update, then falls silent.
    sim.new = Behaviour {
        heartbeats: true,
        ..silent
    };
    sim.step();
    sim.step();
    sim.new = silent;
    sim.run_for(48);
    assert_eq!(sim.r.halt(), Some(Halt::Unhealthy(Metric::Heartbeats)));
    // The first phase's two beats each over its first minutes may pass it (20 device-hours
    // are reached 12 minutes after 100 successes, and the gate judges then); the silence
    // stops the next one. A larger minObservedSecs would judge phase 0 on more of it.
    assert!(
        matches!(sim.r.state(), State::Stopped { phase: 0 | 1 }),
        "{:?}",
        sim.r.state()
    );
}

#[test]
fn a_release_as_healthy_as_the_old_one_completes_and_its_update_reboots_do_not_count() {
    let mut sim = Sim::new(config(every_measure()), OLD);
    sim.run_for(24 * 7);
    assert_eq!(sim.r.state(), State::Completed, "halt: {:?}", sim.r.halt());
    assert_eq!(sim.r.counts().succeeded, FLEET);
}

#[test]
fn without_a_gate_a_crashy_release_is_not_stopped_by_health() {
    let crashy = Behaviour {
        crash_every_min: 30,
        heartbeats: true,
    };
    let mut sim = Sim::new(config(HealthGate::default()), crashy);
    sim.run_for(24 * 7);
    assert_eq!(sim.r.state(), State::Completed);
}

#[test]
fn a_gated_rollout_whose_new_devices_are_never_heard_still_ends() {
    let gate = HealthGate {
        max_crash_ratio: Some(2.0),
        ..HealthGate::default()
    };
    let mut sim = Sim::new(config(gate), SILENT);
    sim.run_for(24 * 7);
    assert_eq!(sim.r.state(), State::Completed);
    // Each of the two held phases waited at most the waiting deadline (an hour); the last
    // phase's 9,000 devices take 18 rounds of 500.
    assert!(sim.now <= 5 * 60 * MIN, "it took {} min", sim.now / MIN);
}

#[test]
fn one_old_device_lying_about_its_crashes_does_not_hide_a_crashy_release() {
    let crashy = Behaviour {
        crash_every_min: 30,
        heartbeats: true,
    };
    // Crashes alone judged (a crash is also a reboot, and reboots would stop it anyway).
    let gate = HealthGate {
        max_crash_ratio: Some(2.0),
        ..every_measure()
    };
    let gate = HealthGate {
        max_reboot_ratio: None,
        min_heartbeat_ratio: None,
        ..gate
    };
    let mut sim = Sim::new(config(gate), crashy);
    // The last target is never offered in the first phase: it stays on the old version and,
    // as fast as the broker lets a device publish (20/s), claims a crash at every beat.
    let liar = sim.ids[FLEET - 1].clone();
    let mut told = 0u32;
    let end = 48 * 60 * MIN;
    while sim.now < end && matches!(sim.r.state(), State::Running { .. }) {
        for beat in 0..(STEP / 50) {
            told = told.saturating_add(1_000_000);
            let lie = Sample {
                crashes: Some(told),
                uptime_s: Some(1),
            };
            sim.r.handle_heartbeat(sim.now + beat * 50, &liar, lie);
        }
        sim.step();
    }
    assert_eq!(sim.r.state(), State::Stopped { phase: 0 });
    assert_eq!(sim.r.halt(), Some(Halt::Unhealthy(Metric::Crashes)));
}

#[test]
fn a_release_whose_devices_are_silent_from_their_success_on_stops_on_heartbeats() {
    let (silent, gate) = (SILENT, heartbeat_gate());
    // Not one beat after the update: the new version's devices are observed from their
    // success on, so their silence counts.
    let mut sim = Sim::new(config(gate), silent);
    sim.run_for(48);
    assert_eq!(sim.r.halt(), Some(Halt::Unhealthy(Metric::Heartbeats)));
    assert_eq!(sim.r.state(), State::Stopped { phase: 0 });
}
