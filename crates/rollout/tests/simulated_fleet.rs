//! The planner against 10,000 simulated devices in simulated time.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use flotilla_rollout::{Action, Config, DeviceState, Outcome, Rollout, State};

const FLEET: usize = 10_000;

fn fleet() -> Vec<String> {
    (0..FLEET).map(|i| format!("dev-{i:05}")).collect()
}

/// Runs the rollout: every notified device finishes `latency` ms later with `outcome(id)`;
/// devices in `offline` stay away until `returns_at`. Returns every device ever notified.
fn simulate(
    config: Config,
    outcome: impl Fn(&str) -> Option<Outcome>,
    offline: &[usize],
    returns_at: u64,
) -> (Rollout, Vec<String>) {
    let mut r = Rollout::new(config, fleet(), 0);
    let ids = r.targets().to_vec();
    for (i, id) in ids.iter().enumerate() {
        if !offline.contains(&i) {
            r.handle_online(0, id);
        }
    }
    let mut notified = Vec::new();
    let mut pending: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    let mut now = 0u64;
    let mut returned = false;
    for _ in 0..1_000_000 {
        while let Some(a) = r.poll_action() {
            if let Action::Notify(id) = a {
                notified.push(id.clone());
                pending.entry(now + 1_000).or_default().push(id);
            }
        }
        if matches!(
            r.state(),
            State::Completed | State::Stopped { .. } | State::Aborted
        ) {
            break;
        }
        let next_report = pending.keys().next().copied();
        let next = [
            next_report,
            r.poll_timeout(),
            (!returned).then_some(returns_at),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(t) = next else { break };
        now = now.max(t);
        if !returned && now >= returns_at {
            returned = true;
            for &i in offline {
                r.handle_online(now, &ids[i]);
            }
        }
        if let Some(batch) = pending.remove(&now) {
            for id in batch {
                if let Some(o) = outcome(&id) {
                    r.handle_outcome(now, &id, o);
                }
            }
        }
        r.handle_timeout(now);
    }
    (r, notified)
}

#[test]
fn a_good_release_reaches_every_device_phase_by_phase() {
    let (r, notified) = simulate(Config::default(), |_| Some(Outcome::Succeeded), &[], 0);
    assert_eq!(r.state(), State::Completed);
    assert_eq!(notified.len(), FLEET);
    assert_eq!(r.counts().succeeded, FLEET);
}

#[test]
fn a_bad_release_stops_in_the_first_phase() {
    let (r, notified) = simulate(Config::default(), |_| Some(Outcome::RolledBack), &[], 0);
    assert_eq!(r.state(), State::Stopped { phase: 0 });
    // Phase 1 is 1% = 100 devices; nobody beyond it was ever offered the release.
    assert!(notified.len() <= 100, "{} devices notified", notified.len());
    assert!(notified.iter().all(|id| id.as_str() < "dev-00100"));
}

#[test]
fn devices_that_never_answer_time_out_as_failures_and_stop_the_rollout() {
    let config = Config {
        device_timeout_ms: 5_000,
        ..Config::default()
    };
    let (r, notified) = simulate(config, |_| None, &[], 0);
    assert_eq!(r.state(), State::Stopped { phase: 0 });
    assert!(
        notified
            .iter()
            .all(|id| r.device(id) == Some(DeviceState::TimedOut))
    );
}

#[test]
fn concurrency_is_bounded() {
    let config = Config {
        max_concurrent: 7,
        phases: vec![100.0],
        ..Config::default()
    };
    let mut r = Rollout::new(config, fleet(), 0);
    for id in r.targets().to_vec() {
        r.handle_online(0, &id);
    }
    let offered = std::iter::from_fn(|| r.poll_action())
        .filter(|a| matches!(a, Action::Notify(_)))
        .count();
    assert_eq!(offered, 7);
    assert_eq!(r.counts().in_flight, 7);
}

#[test]
fn offline_devices_catch_up_when_they_return() {
    // Ten devices of the first 1% are offline at the start and return at t = 1 h.
    let offline: Vec<usize> = (0..10).collect();
    let (r, notified) = simulate(
        Config::default(),
        |_| Some(Outcome::Succeeded),
        &offline,
        3_600_000,
    );
    assert_eq!(r.state(), State::Completed);
    assert_eq!(notified.len(), FLEET);
}

#[test]
fn pause_resume_and_abort() {
    let mut r = Rollout::new(
        Config {
            phases: vec![100.0],
            max_concurrent: 10,
            ..Config::default()
        },
        fleet(),
        0,
    );
    r.pause();
    for id in r.targets().to_vec() {
        r.handle_online(0, &id);
    }
    let notified = |r: &mut Rollout| {
        std::iter::from_fn(|| r.poll_action())
            .filter(|a| matches!(a, Action::Notify(_)))
            .count()
    };
    assert_eq!(notified(&mut r), 0, "paused: nobody is offered the release");
    r.resume(1);
    assert_eq!(notified(&mut r), 10);
    r.abort();
    for id in &fleet()[..10] {
        r.handle_outcome(2, id, Outcome::Succeeded);
    }
    r.handle_timeout(3);
    assert_eq!(r.state(), State::Aborted);
    assert_eq!(notified(&mut r), 0, "after abort no device is notified");
}

#[test]
fn a_scheduled_rollout_waits_for_its_start_time() {
    let mut r = Rollout::new(
        Config {
            start_at_ms: 10_000,
            ..Config::default()
        },
        fleet(),
        0,
    );
    for id in r.targets().to_vec() {
        r.handle_online(0, &id);
    }
    assert_eq!(r.state(), State::Scheduled);
    assert_eq!(r.poll_timeout(), Some(10_000));
    r.handle_timeout(10_000);
    assert_eq!(r.state(), State::Running { phase: 0 });
    assert!(std::iter::from_fn(|| r.poll_action()).any(|a| matches!(a, Action::Notify(_))));
}

#[test]
fn offers_are_made_only_inside_the_maintenance_window() {
    use flotilla_rollout::Window;
    const HOUR: u64 = 3_600_000;
    // 23:00-01:00 UTC, wrapping past midnight; the rollout is created at 12:00.
    let window = Window {
        start_ms: 23 * HOUR,
        end_ms: HOUR,
    };
    let config = Config {
        phases: vec![100.0],
        max_concurrent: 50,
        device_timeout_ms: 10 * HOUR,
        wait_timeout_ms: 24 * HOUR,
        window: Some(window),
        ..Config::default()
    };
    let start = 12 * HOUR;
    let mut r = Rollout::new(config, fleet()[..200].to_vec(), start);
    for id in r.targets().to_vec() {
        r.handle_online(start, &id);
    }
    assert_eq!(r.poll_timeout(), Some(start + 11 * HOUR));
    let mut now = start;
    let mut offers = Vec::new();
    while !matches!(r.state(), State::Completed) {
        while let Some(a) = r.poll_action() {
            if let Action::Notify(id) = a {
                offers.push((now, id));
            }
        }
        let batch: Vec<String> = offers
            .iter()
            .filter(|(t, _)| *t == now)
            .map(|(_, id)| id.clone())
            .collect();
        if batch.is_empty() {
            // Nothing in flight: sleep until the planner's next wake-up (the window opening).
            now = r.poll_timeout().expect("a wake-up while devices wait");
            r.handle_timeout(now);
            continue;
        }
        // Each batch finishes 20 minutes after it was offered.
        now += 20 * 60_000;
        for id in batch {
            r.handle_outcome(now, &id, Outcome::Succeeded);
        }
        assert!(
            now < start + 3 * 24 * HOUR,
            "rollout never finished: {:?} {:?} offers {} at {}",
            r.state(),
            r.counts(),
            offers.len(),
            now % (24 * HOUR) / 60_000
        );
    }
    assert_eq!(offers.len(), 200);
    for (t, id) in &offers {
        assert!(
            window.contains(*t),
            "{id} offered at {} ms into the day",
            t % (24 * HOUR)
        );
    }
    // 50 at a time, 20 minutes each, two hours a night: 300 a night, so 200 fit in one.
    let first = offers.iter().map(|(t, _)| *t).min().unwrap();
    assert_eq!(first, start + 11 * HOUR);
}
