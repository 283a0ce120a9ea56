//! The indexed planner makes exactly the decisions of the straightforward one it replaced,
//! for random fleets and random event sequences (offers, outcomes, presence, time, controls).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod reference;

use flotilla_rollout::{Config, Outcome, Rollout, State};
use proptest::prelude::*;
use reference::Reference;

#[derive(Debug, Clone)]
enum Event {
    Online(usize),
    Offline(usize),
    Outcome(usize, u8),
    Advance(u64),
    Pause,
    Resume,
    Abort,
}

fn event(n: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..n).prop_map(Event::Online),
        1 => (0..n).prop_map(Event::Offline),
        6 => (0..n, 0..3u8).prop_map(|(i, o)| Event::Outcome(i, o)),
        3 => (0..5_000u64).prop_map(Event::Advance),
        1 => Just(Event::Pause),
        1 => Just(Event::Resume),
        1 => Just(Event::Abort).prop_filter("rare", |_| true),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn indexed_and_reference_planners_agree(
        n in 1usize..60,
        max_concurrent in 1usize..8,
        min_failures in 1usize..4,
        failure_threshold in 0.0f64..1.0,
        success_threshold in 0.0f64..1.0,
        events in proptest::collection::vec(event(60), 1..200),
    ) {
        let config = Config {
            phases: vec![10.0, 50.0, 100.0],
            success_threshold,
            failure_threshold,
            min_failures,
            device_timeout_ms: 3_000,
            // The reference predates skipping and overrides: never skip, never resume a halt.
            wait_timeout_ms: u64::MAX,
            on_failure: flotilla_rollout::OnFailure::Stop,
            max_concurrent,
            start_at_ms: 1_000,
            window: None,
            health: flotilla_rollout::HealthGate::default(),
        };
        let targets: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        let mut a = Rollout::new(config.clone(), targets.clone(), 0);
        let mut b = Reference::new(config, targets, 0);
        let mut now = 0u64;
        for e in events {
            match e {
                Event::Online(i) => { a.handle_online(now, &format!("d{}", i % n)); b.handle_online(now, &format!("d{}", i % n)); }
                Event::Offline(i) => { a.handle_offline(now, &format!("d{}", i % n)); b.handle_offline(&format!("d{}", i % n)); }
                Event::Outcome(i, o) => {
                    let o = [Outcome::Succeeded, Outcome::Failed, Outcome::RolledBack][o as usize];
                    a.handle_outcome(now, &format!("d{}", i % n), o);
                    b.handle_outcome(now, &format!("d{}", i % n), o);
                }
                Event::Advance(ms) => {
                    now += ms;
                    if a.poll_timeout().is_some_and(|t| t <= now) { a.handle_timeout(now); }
                    if b.poll_timeout().is_some_and(|t| t <= now) { b.handle_timeout(now); }
                }
                Event::Pause => { a.pause(); b.pause(); }
                Event::Resume if matches!(a.state(), State::Stopped { .. }) => {}
                Event::Resume => { a.resume(now); b.resume(now); }
                Event::Abort => { a.abort(); b.abort(); }
            }
            let actions_a: Vec<_> = std::iter::from_fn(|| a.poll_action()).collect();
            let actions_b: Vec<_> = std::iter::from_fn(|| b.poll_action()).collect();
            prop_assert_eq!(actions_a, actions_b);
            prop_assert_eq!(a.state(), b.state());
            prop_assert_eq!(a.counts(), b.counts());
            prop_assert_eq!(a.poll_timeout(), b.poll_timeout());
        }
    }
}
