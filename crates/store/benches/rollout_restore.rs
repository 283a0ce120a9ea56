//! Rollout restore: how long a server that restarts or takes over the lease needs to rebuild a
//! rollout of 100,000 targets — read the saved target rows, then restore the planner — on
//! SQLite and on PostgreSQL. Baseline in the same run: the rebuild it replaced, which made a
//! new planner and replayed every device's presence and known outcome through it.
//!
//! Run: `cargo bench -p flotilla-store --bench rollout_restore` (figures in docs/benchmarks.md;
//! needs the local PostgreSQL service, else only SQLite runs).

use std::time::Instant;

use flotilla_rollout::{Action, Config, DeviceState, Forgiven, Outcome, Rollout, Snapshot, State};
use flotilla_store::{DatabaseUrl, RolloutSave, RolloutState, Store, TargetRow, TargetState};

const TARGETS: usize = 100_000;
const ROUNDS: usize = 5;

/// Phase 3 (50%) of a rollout: 48,000 succeeded, 500 failed, 500 skipped, 1,000 in flight.
fn saved_state(i: usize) -> TargetState {
    match i {
        0..48_000 => TargetState::Succeeded,
        48_000..48_500 => TargetState::Failed,
        48_500..49_000 => TargetState::Skipped,
        49_000..50_000 => TargetState::InFlight,
        _ => TargetState::Waiting,
    }
}

fn device_state(t: &TargetRow) -> DeviceState {
    match t.state {
        TargetState::Waiting => DeviceState::Waiting,
        TargetState::InFlight => DeviceState::InFlight {
            since: t.since.unwrap_or(0) as u64,
        },
        TargetState::Succeeded => DeviceState::Succeeded,
        TargetState::Failed => DeviceState::Failed,
        TargetState::TimedOut => DeviceState::TimedOut,
        TargetState::Skipped => DeviceState::Skipped,
    }
}

async fn prepare(store: &Store) -> anyhow::Result<()> {
    let ids: Vec<String> = (0..TARGETS).map(|i| format!("dev-{i:06}")).collect();
    store
        .create_rollout("bench", "1.1.0", &serde_json::json!({}), &ids, 1)
        .await?;
    store
        .save_rollout(&RolloutSave {
            id: "bench",
            state: RolloutState::Running,
            phase: Some(2),
            halt: None,
            reason: None,
            wait_until: Some(i64::MAX / 2),
            forgiven_failed: 0,
            forgiven_succeeded: 0,
            overrides: 0,
            targets: (0..TARGETS)
                .filter(|&i| saved_state(i) != TargetState::Waiting)
                .map(|i| {
                    let since = (saved_state(i) == TargetState::InFlight).then_some(1_000);
                    (i as i64, saved_state(i), since)
                })
                .collect(),
            offers: Vec::new(),
            answered_control: None,
            cancel_unstarted: None,
            audit: Vec::new(),
        })
        .await?;
    Ok(())
}

/// (read ms, restore ms, replay ms), medians over the rounds.
async fn measure(store: &Store) -> anyhow::Result<(f64, f64, f64)> {
    let (mut read, mut restore, mut replay) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let rows = store.rollout_targets("bench").await?;
        read.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(rows.len(), TARGETS);
        let ids: Vec<String> = rows.iter().map(|r| r.device_id.clone()).collect();

        let t = Instant::now();
        let snapshot = Snapshot {
            state: State::Running { phase: 2 },
            halt: None,
            devices: rows.iter().map(device_state).collect(),
            wait_until: u64::MAX / 2,
            forgiven: Forgiven::default(),
        };
        let mut r = Rollout::restore(Config::default(), ids.clone(), snapshot, 2_000)
            .map_err(|e| anyhow::anyhow!(e))?;
        for id in &ids {
            r.handle_online(2_000, id);
        }
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(r.counts());

        // The replaced rebuild: a new planner in phase 1, every presence and known outcome fed
        // through it until it is back where it was.
        let t = Instant::now();
        let known: std::collections::HashMap<&str, TargetState> = rows
            .iter()
            .map(|r| (r.device_id.as_str(), r.state))
            .collect();
        let mut r = Rollout::new(
            Config {
                max_concurrent: TARGETS,
                ..Config::default()
            },
            ids.clone(),
            2_000,
        );
        for id in &ids {
            r.handle_online(2_000, id);
        }
        while let Some(a) = r.poll_action() {
            if let Action::Notify(id) = a {
                let outcome = match known.get(id.as_str()) {
                    Some(TargetState::Succeeded) => Some(Outcome::Succeeded),
                    Some(TargetState::Failed) => Some(Outcome::Failed),
                    _ => None,
                };
                if let Some(o) = outcome {
                    r.handle_outcome(2_000, &id, o);
                }
            }
        }
        replay.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(r.counts());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(read), median(restore), median(replay)))
}

fn report(engine: &str, (read, restore, replay): (f64, f64, f64)) {
    println!(
        "{engine}: {TARGETS} targets: read rows {read:.0} ms, restore planner {restore:.0} ms \
         (total {:.0} ms); baseline replay {replay:.0} ms (plus the same read)",
        read + restore
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sqlite = Store::open(&DatabaseUrl::Sqlite(dir.path().join("bench.db"))).await?;
    prepare(&sqlite).await?;
    report("sqlite", measure(&sqlite).await?);
    match flotilla_pgtest::TempDatabase::create("flotilla_bench_").await {
        Ok(db) => {
            let pg = Store::open(&DatabaseUrl::Postgres(db.url().to_string())).await?;
            prepare(&pg).await?;
            report("postgres", measure(&pg).await?);
        }
        Err(e) => println!("postgres: not run ({e})"),
    }
    Ok(())
}
