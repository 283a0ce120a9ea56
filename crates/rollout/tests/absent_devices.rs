//! The planner with devices that are never there, vanish mid-update, come back late, and with
//! server restarts (snapshot and restore) and wall-clock steps — all in simulated time.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_rollout::{
    Action, Config, Counts, DeviceState, Halt, OnFailure, Outcome, Rollout, State,
};

const FLEET: usize = 10_000;
const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    /// Online, reports this outcome a minute after the offer.
    Answers(Outcome),
    /// Never comes online.
    Absent,
    /// Online; goes offline when offered the release and is never heard of again.
    Vanishes,
    /// Offline until this time, then answers with success.
    ReturnsAt(u64),
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("dev-{i:05}")).collect()
}

/// 5% never online, 5% vanish mid-update, spread through the fleet.
fn absentees(i: usize, good: Outcome) -> Peer {
    match i % 20 {
        3 => Peer::Absent,
        11 => Peer::Vanishes,
        _ => Peer::Answers(good),
    }
}

/// A fleet of simulated peers around one planner, in simulated time.
struct Run {
    r: Rollout,
    peers: Vec<Peer>,
    now: u64,
    online: std::collections::BTreeSet<usize>,
    reports: std::collections::BTreeMap<u64, Vec<usize>>,
    returns: std::collections::BTreeMap<u64, Vec<usize>>,
    offers: Vec<String>,
    transitions: Vec<State>,
}

/// Starts `r` at `start` with `peers` (target `i` is `peers[i]`).
fn start(mut r: Rollout, peers: &[Peer], start: u64) -> Run {
    let ids = r.targets().to_vec();
    let mut run = Run {
        r: Rollout::new(Config::default(), Vec::new(), 0),
        peers: peers.to_vec(),
        now: start,
        online: Default::default(),
        reports: Default::default(),
        returns: Default::default(),
        offers: Vec::new(),
        transitions: Vec::new(),
    };
    for (i, p) in peers.iter().enumerate() {
        match p {
            Peer::Answers(_) | Peer::Vanishes => {
                run.online.insert(i);
                r.handle_online(start, &ids[i]);
            }
            Peer::ReturnsAt(t) => {
                run.returns.entry(*t).or_default().push(i);
            }
            Peer::Absent => {}
        }
    }
    run.r = r;
    run
}

/// Runs `config` over `peers` from time 0 until the rollout ends or `until` passes.
fn drive(r: Rollout, peers: &[Peer], at: u64, until: u64) -> Run {
    go(start(r, peers, at), until)
}

/// Carries on until the rollout ends (or pauses) or `until` (simulated ms) passes.
fn go(mut run: Run, until: u64) -> Run {
    let ids = run.r.targets().to_vec();
    let index: std::collections::HashMap<String, usize> = ids
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    loop {
        while let Some(a) = run.r.poll_action() {
            match a {
                Action::Notify(id) => {
                    let i = index[&id];
                    match run.peers[i] {
                        Peer::Vanishes => {
                            run.online.remove(&i);
                            run.r.handle_offline(run.now, &id);
                        }
                        _ => run.reports.entry(run.now + MIN).or_default().push(i),
                    }
                    run.offers.push(id);
                }
                Action::Transition(s) => run.transitions.push(s),
            }
        }
        if matches!(
            run.r.state(),
            State::Completed | State::Stopped { .. } | State::Aborted | State::Paused { .. }
        ) {
            return run;
        }
        let next = [
            run.reports.keys().next().copied(),
            run.returns.keys().next().copied(),
            run.r.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(t) = next.filter(|t| *t <= until) else {
            return run;
        };
        run.now = run.now.max(t);
        if let Some(back) = run.returns.remove(&run.now) {
            for i in back {
                run.online.insert(i);
                run.r.handle_online(run.now, &ids[i]);
            }
        }
        if let Some(batch) = run.reports.remove(&run.now) {
            for i in batch {
                let outcome = match run.peers[i] {
                    Peer::Answers(o) => o,
                    _ => Outcome::Succeeded,
                };
                run.r.handle_outcome(run.now, &ids[i], outcome);
            }
        }
        run.r.handle_timeout(run.now);
    }
}

fn config() -> Config {
    Config {
        success_threshold: 0.85,
        failure_threshold: 0.2,
        max_concurrent: 200,
        device_timeout_ms: 30 * MIN,
        wait_timeout_ms: HOUR,
        ..Config::default()
    }
}

#[test]
fn a_fleet_with_absent_and_vanishing_devices_completes_in_bounded_time_with_right_counts() {
    let peers: Vec<Peer> = (0..FLEET)
        .map(|i| absentees(i, Outcome::Succeeded))
        .collect();
    let run = drive(
        Rollout::new(config(), ids(FLEET), 0),
        &peers,
        0,
        30 * 24 * HOUR,
    );
    assert_eq!(run.r.state(), State::Completed);
    // Four phases, each bounded by the waiting deadline and the device timeout.
    assert!(
        run.now <= 4 * (HOUR + 30 * MIN) + 10 * HOUR,
        "ended at {} h",
        run.now / HOUR
    );
    assert_eq!(
        run.r.counts(),
        Counts {
            waiting: 0,
            in_flight: 0,
            succeeded: 9_000,
            failed: 0,
            timed_out: 500,
            skipped: 500,
        }
    );
    assert_eq!(run.offers.len(), 9_500, "the absent were never offered it");
    for (i, id) in run.r.targets().iter().enumerate() {
        let expected = match peers[i] {
            Peer::Absent => DeviceState::Skipped,
            Peer::Vanishes => DeviceState::TimedOut,
            _ => DeviceState::Succeeded,
        };
        assert_eq!(run.r.device(id), Some(expected), "{id}");
    }
}

#[test]
fn a_bad_release_still_stops_in_the_first_phase_among_absent_devices() {
    let peers: Vec<Peer> = (0..FLEET).map(|i| absentees(i, Outcome::Failed)).collect();
    let run = drive(
        Rollout::new(config(), ids(FLEET), 0),
        &peers,
        0,
        30 * 24 * HOUR,
    );
    assert_eq!(run.r.state(), State::Stopped { phase: 0 });
    assert_eq!(run.r.halt(), Some(Halt::TooManyFailures));
    assert!(run.offers.len() <= 100, "{} offers", run.offers.len());
    assert!(
        run.now < HOUR,
        "stopped at once, not after the waiting deadline"
    );
}

#[test]
fn a_skipped_device_that_returns_while_the_rollout_runs_is_offered_and_counted_once() {
    // 100 devices, one phase: dev-00007 is offline and returns after its waiting deadline,
    // while the others keep the rollout running (one at a time, a minute each).
    let mut peers = vec![Peer::Answers(Outcome::Succeeded); 100];
    peers[7] = Peer::ReturnsAt(90 * MIN);
    let config = Config {
        phases: vec![100.0],
        max_concurrent: 1,
        ..config()
    };
    let run = drive(Rollout::new(config, ids(100), 0), &peers, 0, 80 * MIN);
    assert_eq!(run.r.device("dev-00007"), Some(DeviceState::Skipped));
    assert_eq!(run.r.counts().skipped, 1);
    let run = go(run, 24 * HOUR);
    assert_eq!(run.r.state(), State::Completed);
    assert_eq!(run.r.device("dev-00007"), Some(DeviceState::Succeeded));
    assert_eq!(run.r.counts().succeeded, 100);
    assert_eq!(run.r.counts().skipped, 0);
    assert_eq!(run.offers.iter().filter(|id| *id == "dev-00007").count(), 1);
}

#[test]
fn a_device_offline_for_good_is_skipped_and_the_rollout_still_ends() {
    let mut peers = vec![Peer::Answers(Outcome::Succeeded); 50];
    peers[10] = Peer::Absent;
    let run = drive(Rollout::new(config(), ids(50), 0), &peers, 0, 24 * HOUR);
    assert_eq!(run.r.state(), State::Completed);
    assert_eq!(run.r.device("dev-00010"), Some(DeviceState::Skipped));
    assert_eq!(run.r.counts().skipped, 1);
}

#[test]
fn a_phase_whose_devices_were_all_skipped_does_not_pass_for_a_release_nobody_ran() {
    // The 1% canary (one device of 50) is offline: nothing shows the release works.
    let mut peers = vec![Peer::Answers(Outcome::Succeeded); 50];
    peers[0] = Peer::Absent;
    let run = drive(Rollout::new(config(), ids(50), 0), &peers, 0, 24 * HOUR);
    assert_eq!(run.r.state(), State::Stopped { phase: 0 });
    assert_eq!(run.r.halt(), Some(Halt::NoDeviceReached));
    assert!(run.offers.is_empty());
    // An operator's override lets it go on without the canary.
    let (mut r, now) = (run.r, run.now);
    r.resume(now);
    let run = drive(r, &peers, now, 24 * HOUR);
    assert_eq!(run.r.state(), State::Completed);
    assert_eq!(run.r.counts().succeeded, 49);
    assert_eq!(run.r.counts().skipped, 1);
}

#[test]
fn offers_decided_when_the_rollout_halts_are_withdrawn_and_the_targets_wait() {
    let mut r = Rollout::new(
        Config {
            phases: vec![100.0],
            max_concurrent: 2,
            ..config()
        },
        ids(4),
        0,
    );
    for id in ids(4) {
        r.handle_online(0, &id);
    }
    let offered: Vec<String> = std::iter::from_fn(|| r.poll_action())
        .filter_map(|a| match a {
            Action::Notify(id) => Some(id),
            _ => None,
        })
        .collect();
    r.pause();
    for id in &offered {
        r.handle_offer_withdrawn(id);
    }
    assert_eq!(r.counts().in_flight, 0);
    assert_eq!(r.counts().waiting, 4);
    r.resume(10);
    let again = std::iter::from_fn(|| r.poll_action())
        .filter(|a| matches!(a, Action::Notify(_)))
        .count();
    assert_eq!(again, 2, "offered again on resume");
}

#[test]
fn the_waiting_deadline_does_not_run_out_while_the_maintenance_window_is_closed() {
    use flotilla_rollout::Window;
    // Window 02:00-04:00; created at 00:00 with one device offline and a 1 h wait.
    let config = Config {
        phases: vec![100.0],
        window: Some(Window {
            start_ms: 2 * HOUR,
            end_ms: 4 * HOUR,
        }),
        ..config()
    };
    let mut r = Rollout::new(config, ids(2), 0);
    r.handle_online(0, "dev-00000");
    r.handle_timeout(HOUR + 1);
    assert_eq!(
        r.device("dev-00001"),
        Some(DeviceState::Waiting),
        "not skipped at 01:00"
    );
    assert_eq!(r.wait_until(), 3 * HOUR, "an hour after the window opens");
    r.handle_timeout(3 * HOUR);
    assert_eq!(r.device("dev-00001"), Some(DeviceState::Skipped));
}

#[test]
fn a_restore_refuses_forgiveness_beyond_what_happened_and_clamps_future_offers() {
    let r = Rollout::new(
        Config {
            phases: vec![100.0],
            ..config()
        },
        ids(2),
        0,
    );
    let mut s = r.snapshot();
    s.forgiven.failed = 1;
    assert!(Rollout::restore(config(), ids(2), s, 0).is_err());
    let mut s = r.snapshot();
    s.state = State::Running { phase: 0 };
    s.devices[0] = DeviceState::InFlight { since: 10 * HOUR };
    s.wait_until = 100 * HOUR;
    let restored = Rollout::restore(
        Config {
            phases: vec![100.0],
            ..config()
        },
        ids(2),
        s,
        HOUR,
    )
    .unwrap();
    assert_eq!(
        restored.poll_timeout(),
        Some(HOUR + 30 * MIN),
        "times out from now, not from the future"
    );
}

#[test]
fn pause_on_failure_halts_into_pause_and_resuming_forgives_what_was_seen() {
    // The first 2 devices fail; everyone after succeeds.
    let peers: Vec<Peer> = (0..100)
        .map(|i| {
            Peer::Answers(if i < 2 {
                Outcome::Failed
            } else {
                Outcome::Succeeded
            })
        })
        .collect();
    let config = Config {
        phases: vec![10.0, 100.0],
        on_failure: OnFailure::Pause,
        min_failures: 2,
        success_threshold: 0.5,
        max_concurrent: 1,
        ..config()
    };
    let run = drive(Rollout::new(config, ids(100), 0), &peers, 0, 24 * HOUR);
    assert_eq!(run.r.state(), State::Paused { phase: 0 });
    assert_eq!(run.r.halt(), Some(Halt::TooManyFailures));
    let (mut r, now) = (run.r, run.now);
    r.resume(now);
    assert_eq!(r.halt(), None);
    assert_eq!(r.forgiven().failed, 2);
    let run = drive(r, &peers, now, 24 * HOUR);
    assert_eq!(
        run.r.state(),
        State::Completed,
        "the override let it finish"
    );
    assert_eq!(run.r.counts().failed, 2);
    assert_eq!(run.r.counts().succeeded, 98);
}

#[test]
fn a_stopped_rollout_resumed_by_an_override_stops_again_on_new_failures() {
    let peers: Vec<Peer> = (0..100)
        .map(|i| {
            Peer::Answers(if i % 2 == 0 {
                Outcome::Failed
            } else {
                Outcome::Succeeded
            })
        })
        .collect();
    let config = Config {
        max_concurrent: 1,
        phases: vec![100.0],
        ..config()
    };
    let run = drive(Rollout::new(config, ids(100), 0), &peers, 0, 24 * HOUR);
    assert_eq!(run.r.state(), State::Stopped { phase: 0 });
    let stopped_after = run.offers.len();
    let (mut r, now) = (run.r, run.now);
    r.resume(now);
    assert_eq!(r.state(), State::Running { phase: 0 });
    let run = drive(r, &peers, now, 24 * HOUR);
    assert_eq!(run.r.state(), State::Stopped { phase: 0 });
    assert!(
        !run.offers.is_empty(),
        "it offered again after the override"
    );
    assert!(stopped_after + run.offers.len() < 100);
}

/// Runs `config` over `peers` once straight through, and once with a server restart
/// (snapshot, restore, presence fed again; reports in transit still arrive) at `cut`: the
/// restored planner emits nothing for what happened and reaches the same end.
fn restore_matches_straight_run(peers: &[Peer], config: Config, cut: u64) {
    let straight = drive(
        Rollout::new(config.clone(), ids(peers.len()), 0),
        peers,
        0,
        u64::MAX,
    );
    let mut run = drive(
        Rollout::new(config.clone(), ids(peers.len()), 0),
        peers,
        0,
        cut,
    );
    let before = run.r.state();
    let snapshot = run.r.snapshot();
    let mut restored =
        Rollout::restore(config, ids(peers.len()), snapshot.clone(), run.now).unwrap();
    assert_eq!(restored.state(), before);
    assert_eq!(restored.counts(), run.r.counts());
    assert_eq!(restored.snapshot(), snapshot);
    for &i in &run.online {
        restored.handle_online(run.now, &ids(peers.len())[i]);
    }
    run.r = restored;
    run.transitions.clear();
    let offers_before = run.offers.len();
    let rest = go(run, u64::MAX);
    assert_eq!(rest.r.state(), straight.r.state());
    assert_eq!(rest.r.counts(), straight.r.counts());
    assert!(
        !rest.transitions.contains(&before),
        "{before:?} entered again"
    );
    assert_eq!(
        rest.offers.len(),
        straight.offers.len(),
        "no device offered twice"
    );
    assert!(rest.offers.len() >= offers_before);
}

#[test]
fn a_restored_planner_continues_where_it_was() {
    let peers: Vec<Peer> = (0..2_000)
        .map(|i| absentees(i, Outcome::Succeeded))
        .collect();
    for cut in [10 * MIN, HOUR + 5 * MIN, 3 * HOUR] {
        restore_matches_straight_run(&peers, config(), cut);
    }
}

#[test]
fn a_restore_refuses_states_that_do_not_fit_the_targets() {
    let r = Rollout::new(config(), ids(10), 0);
    let mut s = r.snapshot();
    s.devices.pop();
    assert!(Rollout::restore(config(), ids(10), s.clone(), 0).is_err());
    let mut s = r.snapshot();
    s.devices[9] = DeviceState::Succeeded; // phase 1 admits 1 of 10
    assert!(Rollout::restore(config(), ids(10), s, 0).is_err());
}

#[test]
fn a_wall_clock_step_does_not_time_out_devices_in_flight() {
    let mut r = Rollout::new(
        Config {
            phases: vec![100.0],
            ..config()
        },
        ids(10),
        0,
    );
    for id in ids(10) {
        r.handle_online(0, &id);
    }
    while r.poll_action().is_some() {}
    // NTP steps the wall clock a day forward; planner time moves on by one second.
    r.set_wall_offset(24 * HOUR as i64);
    r.handle_timeout(1_000);
    assert_eq!(r.counts().in_flight, 10);
    assert_eq!(r.counts().timed_out, 0);
    assert_eq!(
        r.poll_timeout(),
        Some(30 * MIN),
        "the deadline is still 30 min after the offer"
    );
}

#[test]
fn the_start_time_is_wall_clock() {
    let config = Config {
        start_at_ms: 1_000_000,
        ..config()
    };
    let mut r = Rollout::new(config, ids(10), 0);
    // Planner time 0 is wall 999_000: the start is a second away.
    r.set_wall_offset(999_000);
    assert_eq!(r.poll_timeout(), Some(1_000));
    r.handle_timeout(1_000);
    assert_eq!(r.state(), State::Running { phase: 0 });
}

#[test]
fn a_target_busy_with_another_update_waits_and_is_offered_when_seen_again() {
    let mut r = Rollout::new(
        Config {
            phases: vec![100.0],
            ..config()
        },
        ids(2),
        0,
    );
    r.handle_online(0, "dev-00000");
    assert_eq!(
        r.poll_action(),
        Some(Action::Transition(State::Running { phase: 0 }))
    );
    assert_eq!(r.poll_action(), Some(Action::Notify("dev-00000".into())));
    r.handle_offer_refused(10, "dev-00000");
    assert_eq!(r.device("dev-00000"), Some(DeviceState::Waiting));
    assert_eq!(r.counts().in_flight, 0);
    assert_eq!(r.poll_action(), None, "not offered again until seen online");
    r.handle_online(2_000, "dev-00000");
    assert_eq!(r.poll_action(), Some(Action::Notify("dev-00000".into())));
}

#[test]
fn the_waiting_deadline_is_postponed_once_even_when_the_window_is_no_longer_than_the_wait() {
    use flotilla_rollout::Window;
    // Window 02:00-03:00 and a 1 h wait: postponed to 03:00, when the window has closed
    // again — the device is skipped then, not postponed day after day.
    let config = Config {
        phases: vec![100.0],
        window: Some(Window {
            start_ms: 2 * HOUR,
            end_ms: 3 * HOUR,
        }),
        ..config()
    };
    let mut r = Rollout::new(config, ids(2), 0);
    r.handle_online(0, "dev-00000");
    r.handle_timeout(HOUR);
    assert_eq!(r.wait_until(), 3 * HOUR);
    r.handle_timeout(3 * HOUR);
    assert_eq!(r.device("dev-00001"), Some(DeviceState::Skipped));
}

#[test]
fn a_phase_that_admits_nobody_new_does_not_stall_a_small_fleet() {
    // Two targets and phases 1/10/50/100%: phases 1 and 2 both admit one device.
    let peers = vec![Peer::Answers(Outcome::Succeeded); 2];
    let run = drive(
        Rollout::new(Config::default(), ids(2), 0),
        &peers,
        0,
        24 * HOUR,
    );
    assert_eq!(run.r.state(), State::Completed);
    assert_eq!(run.r.counts().succeeded, 2);
}
