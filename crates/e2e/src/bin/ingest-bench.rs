//! Ingest benchmark (issue 8): telemetry durably stored per second and the ingest commit
//! latency, with 1,000 devices each publishing a burst of numbered QoS 1 readings, on every
//! set-up of the server in one run, round after round:
//!
//! * `sqlite`: one server, embedded broker, SQLite (the default);
//! * `postgres`: one server, embedded broker, a fresh PostgreSQL database;
//! * `external-1`: one replica on PostgreSQL behind a Mosquitto 2.0 the bench starts;
//! * `external-2`: two replicas on one PostgreSQL database behind that Mosquitto, sharing its
//!   ingest subscription.
//!
//! "Stored" is counted in the database (the `telemetry` rows), from the first publish to the
//! last commit; the commit latency is the servers' own `flotilla_ingest_commit_seconds`
//! histogram (`GET /metrics`), summed over the replicas, for the burst alone.
//!
//! Run (release build, see docs/benchmarks.md):
//!   cargo build --release --workspace --bins && target/release/ingest-bench --rounds 3
//!
//! Prints one JSON object with every round and the medians.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_e2e::bench::{connect_all, enroll_all, publish_burst_ids};
use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::{DeviceIdentity, Server, wait_for};
use serde_json::{Value, json};

/// Every simulated device connects from this host (see fleet-bench).
const BENCH_ENV: &[(&str, &str)] = &[("FLOTILLA_MQTT_PER_ADDRESS", "1000000")];
/// Devices stay online through the bench.
const SERVER_ARGS: &[&str] = &["--heartbeat-timeout", "600"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sqlite,
    Postgres,
    /// Replicas behind an external Mosquitto, on PostgreSQL.
    External(usize),
}

impl Mode {
    fn parse(s: &str) -> Result<Mode> {
        Ok(match s {
            "sqlite" => Mode::Sqlite,
            "postgres" => Mode::Postgres,
            "external-1" => Mode::External(1),
            "external-2" => Mode::External(2),
            other => {
                anyhow::bail!("unknown mode {other} (sqlite, postgres, external-1, external-2)")
            }
        })
    }

    fn name(self) -> String {
        match self {
            Mode::Sqlite => "sqlite".into(),
            Mode::Postgres => "postgres".into(),
            Mode::External(n) => format!("external-{n}"),
        }
    }
}

struct Args {
    devices: usize,
    messages_per_device: usize,
    concurrency: usize,
    rounds: usize,
    modes: Vec<Mode>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        devices: 1000,
        messages_per_device: 50,
        concurrency: 128,
        rounds: 3,
        modes: vec![
            Mode::Sqlite,
            Mode::Postgres,
            Mode::External(1),
            Mode::External(2),
        ],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("flag needs a value");
        match flag.as_str() {
            "--devices" => a.devices = value()?.parse()?,
            "--messages-per-device" => a.messages_per_device = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--modes" => {
                a.modes = value()?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_>>()?
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(
        !flotilla_e2e::database::postgres_mode() && !flotilla_e2e::external_broker::enabled(),
        "unset FLOTILLA_E2E_DATABASE and FLOTILLA_E2E_BROKER: the modes pick the database and broker"
    );
    Ok(a)
}

/// The servers of one mode, the port devices connect to, and the broker when external.
struct Rig {
    servers: Vec<Server>,
    admin: String,
    device_port: u16,
    _broker: Option<(tempfile::TempDir, Mosquitto)>,
}

async fn rig(mode: Mode, ids_wanted: usize) -> Result<(Rig, Vec<DeviceIdentity>)> {
    let mut a = match mode {
        Mode::Sqlite => Server::start_with_env(SERVER_ARGS, BENCH_ENV).await?,
        _ => Server::start_on_postgres_with_env(SERVER_ARGS, BENCH_ENV).await?,
    };
    let admin = a.admin("bench@example.com").await?;
    let ids = enroll_all(&a, &admin, "bench", ids_wanted).await?;
    let Mode::External(replicas) = mode else {
        let device_port = a.mqtt_port;
        return Ok((
            Rig {
                servers: vec![a],
                admin,
                device_port,
                _broker: None,
            },
            ids,
        ));
    };
    let dir = tempfile::tempdir()?;
    let mosquitto = Mosquitto::start_for_replicas(dir.path(), &a.data_dir(), &["r1", "r2"]).await?;
    let url = format!("mqtts://localhost:{}", mosquitto.service_port);
    let args = |replica: &'static str| {
        let mut args = vec!["--broker-url", url.as_str(), "--replica-id", replica];
        args.extend_from_slice(SERVER_ARGS);
        args
    };
    a.set_args(&args("r1"));
    a.restart().await?;
    let admin = a.login("bench@example.com", "admin-pass").await?;
    let mut servers = vec![a];
    if replicas == 2 {
        let b = servers[0]
            .start_replica_with_env(&args("r2"), BENCH_ENV)
            .await?;
        servers.push(b);
    }
    let device_port = mosquitto.device_port;
    Ok((
        Rig {
            servers,
            admin,
            device_port,
            _broker: Some((dir, mosquitto)),
        },
        ids,
    ))
}

/// The cumulative buckets `(upper bound in s, count)` of the commit latency histogram,
/// summed over `servers`.
async fn commit_buckets(servers: &[Server], admin: &str) -> Result<Vec<(f64, u64)>> {
    let mut sum: Vec<(f64, u64)> = Vec::new();
    for server in servers {
        let text = server
            .client
            .get(format!("{}/metrics", server.http))
            .bearer_auth(admin)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("flotilla_ingest_commit_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, count) = l.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        anyhow::ensure!(!buckets.is_empty(), "no commit histogram in /metrics");
        if sum.is_empty() {
            sum = buckets;
        } else {
            for (s, b) in sum.iter_mut().zip(buckets) {
                s.1 += b.1;
            }
        }
    }
    Ok(sum)
}

/// The `q` quantile in ms of the commits between two readings of the histogram, interpolated
/// within its bucket (the buckets double, so it is exact to within a factor of two).
fn quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (le, cum) in counts {
        if cum as f64 >= target {
            if le.is_infinite() {
                return Some(lower * 1000.0);
            }
            let within = (target - below as f64) / (cum - below).max(1) as f64;
            return Some((lower + (le - lower) * within) * 1000.0);
        }
        (lower, below) = (le, cum);
    }
    None
}

async fn telemetry_rows(server: &Server, admin: &str) -> Option<i64> {
    server.stats(admin).await?["telemetryRows"].as_i64()
}

/// One burst on one mode: its figures.
async fn measure(mode: Mode, args: &Args) -> Result<Value> {
    let (rig, ids) = rig(mode, args.devices).await?;
    let (a, admin) = (&rig.servers[0], rig.admin.as_str());
    let (conns, connects_per_s) = connect_all(rig.device_port, &ids, args.concurrency).await?;
    let total = (args.devices * args.messages_per_device) as i64;
    let rows_before = telemetry_rows(a, admin).await.context("stats")?;
    let hist_before = commit_buckets(&rig.servers, admin).await?;
    let started = Instant::now();
    let publish_s = publish_burst_ids(&conns, &ids, args.messages_per_device, 0).await?;
    wait_for("every reading stored", Duration::from_secs(300), || async {
        let stored = telemetry_rows(a, admin).await? - rows_before;
        (stored >= total).then_some(())
    })
    .await?;
    let stored_s = started.elapsed().as_secs_f64();
    let hist_after = commit_buckets(&rig.servers, admin).await?;
    let mut ingested = Vec::new();
    for server in &rig.servers {
        let stats = server.stats(admin).await.unwrap_or_default();
        ingested.push(stats["ingestLink"]["received"].clone());
    }
    let commits = hist_after.last().map_or(0, |l| l.1) - hist_before.last().map_or(0, |l| l.1);
    drop(conns);
    Ok(json!({
        "mode": mode.name(),
        "messages": total,
        "mtls_connects_per_s": connects_per_s.round(),
        "published_and_acked_per_s": (total as f64 / publish_s).round(),
        "durably_stored_per_s": (total as f64 / stored_s).round(),
        "commits": commits,
        "messages_per_commit": (total as f64 / commits.max(1) as f64).round(),
        "commit_p50_ms": quantile_ms(&hist_before, &hist_after, 0.50).map(round2),
        "commit_p99_ms": quantile_ms(&hist_before, &hist_after, 0.99).map(round2),
        "ingested_per_replica": ingested,
    }))
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        for &mode in &args.modes {
            let figures = measure(mode, &args)
                .await
                .with_context(|| format!("{} in round {round}", mode.name()))?;
            eprintln!("round {round}: {figures}");
            rounds.push(figures);
            // Let the closed sockets go: one process holds at most ~20,000.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let mut medians = serde_json::Map::new();
    for mode in &args.modes {
        let of = |key: &str| {
            median(
                rounds
                    .iter()
                    .filter(|r| r["mode"] == mode.name())
                    .filter_map(|r| r[key].as_f64())
                    .collect(),
            )
        };
        medians.insert(
            mode.name(),
            json!({
                "durably_stored_per_s": of("durably_stored_per_s"),
                "commit_p50_ms": of("commit_p50_ms"),
                "commit_p99_ms": of("commit_p99_ms"),
                "messages_per_commit": of("messages_per_commit"),
            }),
        );
    }
    let report = json!({
        "devices": args.devices,
        "messages_per_device": args.messages_per_device,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "medians": medians,
        "rounds": rounds,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
