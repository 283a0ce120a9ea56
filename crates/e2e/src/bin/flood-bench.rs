//! Login-flood benchmark: MQTT publish→stored latency of a device, without and then with a
//! concurrent flood of failed logins, in one run against one server. The flooding client runs
//! on the same two cores as the server, so its own cost is in the figures.
//!
//! A QoS 1 PUBACK from flotilla-server means the message is committed, so the time from
//! PUBLISH to PUBACK is the publish→stored latency. The flood comes from a new loopback source
//! address and names a new account for every attempt (a distributed guesser), so no login limit
//! short-cuts the password check and each attempt costs an argon2 verification.
//!
//! Run (release build, see docs/benchmarks.md):
//!   cargo build --release --workspace --bins && target/release/flood-bench --logins-per-s 200
//!
//! Prints one JSON object with every figure.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_e2e::Server;
use flotilla_e2e::mqtt::connect_device;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::json;

struct Args {
    samples: usize,
    logins_per_s: u64,
    /// The server (FLOTILLA_SERVER_BIN) predates publish limits: pass no limit flags.
    baseline: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        samples: 400,
        logins_per_s: 200,
        baseline: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("flag needs a value");
        match flag.as_str() {
            "--samples" => a.samples = value()?.parse()?,
            "--logins-per-s" => a.logins_per_s = value()?.parse()?,
            "--baseline" => a.baseline = true,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// p50 and p99 of PUBLISH→PUBACK over `n` telemetry messages sent 10 ms apart, in ms.
async fn latencies(
    session: &mut flotilla_e2e::mqtt::Session,
    device: &str,
    first_seq: usize,
    n: usize,
) -> Result<(f64, f64)> {
    let topic = format!("devices/{device}/telemetry");
    let mut ms = Vec::with_capacity(n);
    for k in 0..n {
        let started = Instant::now();
        let r = session
            .publish(&topic, format!(r#"{{"seq":{},"pot":1}}"#, first_seq + k))
            .await?;
        anyhow::ensure!(r == PubAckReason::Success, "PUBACK {r:?}");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

/// Sends failed logins at `per_s` until `stop`, each from a new 127.x.y.z address for a new
/// account name; counts
/// the attempts started and the answers received.
fn spawn_flood(
    http: String,
    per_s: u64,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s.max(1) as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut k: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            k = k.wrapping_add(1);
            let ip = Ipv4Addr::new(127, 1 + (k >> 16) as u8 % 200, (k >> 8) as u8, k as u8);
            let http = http.clone();
            let sent = sent.clone();
            started.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let Ok(client) = reqwest::Client::builder()
                    .local_address(Some(IpAddr::V4(ip)))
                    .timeout(Duration::from_secs(30))
                    .build()
                else {
                    return;
                };
                let _ = client
                    .post(format!("{http}/api/auth/login"))
                    // A new account each time too: no per-account lockout short-cuts the check.
                    .json(
                        &json!({"email": format!("guess{k}@example.com"), "password": "guess-123"}),
                    )
                    .send()
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    // The probe publishes every 10 ms, past the default per-device rate limit.
    let no_limits = [
        "--device-publish-rate",
        "1000000",
        "--device-publish-burst",
        "1000000",
    ];
    let server = Server::start(if args.baseline { &[] } else { &no_limits }).await?;
    server.admin("root@example.com").await?;
    let jwt = server.user("bench@example.com").await?;
    let id = server.enroll(&jwt, "latency-probe").await?;
    let mut session = connect_device(server.mqtt_port, &id).await?;

    // Warm up the connection and the database.
    latencies(&mut session, "latency-probe", 0, 50).await?;
    let (quiet_p50, quiet_p99) =
        latencies(&mut session, "latency-probe", 1_000, args.samples).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    spawn_flood(
        server.http.clone(),
        args.logins_per_s,
        stop.clone(),
        started.clone(),
        sent.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flood_started = Instant::now();
    let (before, started_before) = (
        sent.load(Ordering::Relaxed),
        started.load(Ordering::Relaxed),
    );
    let (flood_p50, flood_p99) =
        latencies(&mut session, "latency-probe", 100_000, args.samples).await?;
    let secs = flood_started.elapsed().as_secs_f64();
    let logins_per_s = (sent.load(Ordering::Relaxed) - before) as f64 / secs;
    let attempts_per_s = (started.load(Ordering::Relaxed) - started_before) as f64 / secs;
    stop.store(true, Ordering::Relaxed);

    let report = json!({
        "samples": args.samples,
        "quiet": { "p50_ms": quiet_p50, "p99_ms": quiet_p99 },
        "login_flood": {
            "login_attempts_per_s": attempts_per_s.round(),
            "login_answers_per_s": logins_per_s.round(),
            "p50_ms": flood_p50,
            "p99_ms": flood_p99,
        },
        "p99_ratio_flood_over_quiet": flood_p99 / quiet_p99,
        "p50_ratio_flood_over_quiet": flood_p50 / quiet_p50,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
