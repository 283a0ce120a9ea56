//! Rollout planner decisions per second: a whole rollout (phases 1/10/50/100%, 1,000 at a
//! time, every device succeeding 1 ms of simulated time after its offer) of N devices, timed
//! for the indexed planner and, in the same run, for the straightforward planner it replaced.
//!
//! Run: `cargo bench -p flotilla-rollout --bench planner` (figures in docs/benchmarks.md).

#[path = "../tests/reference/mod.rs"]
mod reference;

use std::time::Instant;

use flotilla_rollout::{Action, Config, Outcome, Rollout, State};
use reference::Reference;

/// What both planners offer the driver.
trait Planner {
    fn online(&mut self, now: u64, id: &str);
    fn outcome(&mut self, now: u64, id: &str);
    fn action(&mut self) -> Option<Action>;
    fn state(&self) -> State;
}

/// Both planners have the same inherent methods; forward the trait to them.
macro_rules! planner {
    ($t:ty) => {
        impl Planner for $t {
            fn online(&mut self, now: u64, id: &str) {
                self.handle_online(now, id)
            }
            fn outcome(&mut self, now: u64, id: &str) {
                self.handle_outcome(now, id, Outcome::Succeeded)
            }
            fn action(&mut self) -> Option<Action> {
                self.poll_action()
            }
            fn state(&self) -> State {
                <$t>::state(self)
            }
        }
    };
}

planner!(Rollout);
planner!(Reference);

fn config() -> Config {
    Config {
        max_concurrent: 1_000,
        ..Config::default()
    }
}

/// Drives a full rollout; returns (offers made, seconds).
fn run(mut p: impl Planner, targets: &[String]) -> (usize, f64) {
    let started = Instant::now();
    for id in targets {
        p.online(0, id);
    }
    let mut offers = 0;
    let mut now = 0;
    let mut in_flight = std::collections::VecDeque::new();
    loop {
        while let Some(a) = p.action() {
            if let Action::Notify(id) = a {
                offers += 1;
                in_flight.push_back(id);
            }
        }
        if p.state() == State::Completed {
            break;
        }
        let Some(id) = in_flight.pop_front() else {
            break;
        };
        now += 1;
        p.outcome(now, &id);
    }
    assert_eq!(p.state(), State::Completed);
    (offers, started.elapsed().as_secs_f64())
}

fn main() {
    let sizes: Vec<usize> = std::env::var("PLANNER_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000]);
    for n in sizes {
        let targets: Vec<String> = (0..n).map(|i| format!("dev-{i:06}")).collect();
        let (offers, secs) = run(Rollout::new(config(), targets.clone(), 0), &targets);
        let indexed = offers as f64 / secs;
        // The rescanning planner is quadratic: past 20,000 devices it would take minutes.
        let reference = (n <= 20_000).then(|| {
            let (offers, secs) = run(Reference::new(config(), targets.clone(), 0), &targets);
            offers as f64 / secs
        });
        println!("{}", serde_json_line(n, indexed, reference));
    }
}

fn serde_json_line(n: usize, indexed: f64, reference: Option<f64>) -> String {
    let reference = reference.map_or("null".to_string(), |r| format!("{:.0}", r));
    format!(
        "{{\"devices\": {n}, \"indexed_decisions_per_s\": {indexed:.0}, \"rescanning_decisions_per_s\": {reference}}}"
    )
}
