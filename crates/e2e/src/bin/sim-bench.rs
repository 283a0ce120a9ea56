//! `flotilla-agent sim` at fleet scale (issue 10): N virtual devices in one process, each with
//! its own flash file, key and mutual-TLS broker connection. The devices connect to a
//! Mosquitto the bench starts, in front of one server on PostgreSQL (scale mode): the embedded
//! broker's relay holds three descriptors per device, so one embedded server on this
//! machine's limit of 20,000 holds about 4,800 (docs/benchmarks.md, "The MQTT front door"). Measures the sim process's memory
//! and CPU per device once all are connected and idle, then during an OTA wave (a signed
//! release rolled out to every device in one phase: each downloads it over its own mutual-TLS
//! connection, writes it to its inactive slot, reboots into it and confirms it), and counts
//! the broker connections the devices lost while connected (keep-alive timeouts, resets; a
//! reboot's own disconnect is not one).
//!
//! Run (release build, see docs/benchmarks.md):
//!   cargo build --release --workspace --bins && target/release/sim-bench --devices 10000
//!
//! The wave offers the release to `--max-concurrent` devices at a time (default 2,000): the
//! sim holds a broker connection per device and a download connection per device updating,
//! within the process's descriptor limit.
//!
//! Prints one JSON object with every figure.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_e2e::bench::rss_kib;
use flotilla_e2e::mosquitto::Mosquitto;
use flotilla_e2e::release_kit::Kit;
use flotilla_e2e::{Cli, Proc, Server, bin, wait_for};
use serde_json::{Value, json};

/// Every simulated device connects from this host.
const BENCH_ENV: &[(&str, &str)] = &[("FLOTILLA_MQTT_PER_ADDRESS", "1000000")];

struct Args {
    devices: usize,
    idle_secs: u64,
    image_size: usize,
    max_concurrent: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        devices: 10_000,
        idle_secs: 30,
        image_size: 256 * 1024,
        max_concurrent: 2_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--devices" => a.devices = value()?.parse()?,
            "--idle-secs" => a.idle_secs = value()?.parse()?,
            "--image-size" => a.image_size = value()?.parse()?,
            "--max-concurrent" => a.max_concurrent = value()?.parse()?,
            other => anyhow::bail!(
                "unknown flag {other} (--devices, --idle-secs, --image-size, --max-concurrent)"
            ),
        }
    }
    Ok(a)
}

/// What the sim's progress lines say, as they arrive.
#[derive(Default)]
struct Progress {
    connected: AtomicU64,
    links_lost: AtomicU64,
}

/// CPU time a process has used (user + system), in seconds.
fn cpu_secs(pid: u32, ticks_per_sec: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / ticks_per_sec)
}

/// Memory and CPU of `pid` sampled every 500 ms until `done` says so.
struct Sampled {
    secs: f64,
    cpu_secs: f64,
    rss_start_kib: u64,
    rss_peak_kib: u64,
    rss_end_kib: u64,
}

async fn sample_while<F, Fut>(pid: u32, ticks: f64, mut done: F) -> Result<Sampled>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let cpu0 = cpu_secs(pid, ticks)?;
    let rss_start_kib = rss_kib(pid)?;
    let mut rss_peak_kib = rss_start_kib;
    let mut rss_end_kib = rss_start_kib;
    while !done().await {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_end_kib = rss_kib(pid)?;
        rss_peak_kib = rss_peak_kib.max(rss_end_kib);
    }
    Ok(Sampled {
        secs: started.elapsed().as_secs_f64(),
        cpu_secs: cpu_secs(pid, ticks)? - cpu0,
        rss_start_kib,
        rss_peak_kib,
        rss_end_kib,
    })
}

fn per_device(s: &Sampled, n: usize) -> Value {
    let n = n as f64;
    json!({
        "secs": (s.secs * 10.0).round() / 10.0,
        "cpu_percent_of_one_core": (1000.0 * s.cpu_secs / s.secs).round() / 10.0,
        "cpu_us_per_device_per_s": (1e6 * s.cpu_secs / s.secs / n).round(),
        "rss_start_mib": s.rss_start_kib / 1024,
        "rss_peak_mib": s.rss_peak_kib / 1024,
        "rss_end_mib": s.rss_end_kib / 1024,
        "rss_peak_kib_per_device": (10.0 * s.rss_peak_kib as f64 / n).round() / 10.0,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    flotilla_e2e::init_crypto();
    let args = parse_args()?;
    let n = args.devices;
    let ticks: f64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
        .trim()
        .parse()?;

    let tmp = tempfile::tempdir()?;
    let kit = Kit::new(tmp.path());
    let public_key = kit.public_key();
    let server_args = ["--release-key", &public_key, "--heartbeat-timeout", "600"];
    let mut server = Server::start_on_postgres_with_env(&server_args, BENCH_ENV).await?;
    let broker_dir = tempfile::tempdir()?;
    let mosquitto =
        Mosquitto::start_for_replicas(broker_dir.path(), &server.data_dir(), &["r1"]).await?;
    let service_url = format!("mqtts://localhost:{}", mosquitto.service_port);
    let mut scale_args = vec!["--broker-url", service_url.as_str(), "--replica-id", "r1"];
    scale_args.extend_from_slice(&server_args);
    server.set_args(&scale_args);
    server.restart().await?;
    let jwt = server.admin("admin@example.com").await?;
    let cli = Cli::new(&server, &tmp.path().join("session.json"));
    cli.login("admin@example.com", "admin-pass");

    // The fleet: one sim process, devices on the agent's default timers.
    let count = n.to_string();
    let mut sim = Command::new(bin("flotilla-agent"))
        .arg("--data-dir")
        .arg(tmp.path().join("fleet"))
        .arg("--server-ca")
        .arg(server.data_dir().join("ca.pem"))
        .args(["--backend-url", &server.backend_url()])
        .args([
            "--broker-url",
            &format!("mqtts://localhost:{}", mosquitto.device_port),
        ])
        .args(["--fw-version", "1.0.0", "--release-key", &public_key])
        .args([
            "sim",
            "--count",
            &count,
            "--api-url",
            &server.http,
            "--email",
            "admin@example.com",
            "--password",
            "admin-pass",
            "--report-secs",
            "1",
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = sim.id();
    let stdout = sim.stdout.take().context("sim stdout")?;
    let _sim = Proc(sim);
    let progress = Arc::new(Progress::default());
    let seen = progress.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == "progress" {
                let get = |k: &str| v[k].as_u64().unwrap_or(0);
                seen.connected.store(get("connected"), Ordering::Relaxed);
                seen.links_lost.store(get("links_lost"), Ordering::Relaxed);
            }
        }
    });

    let started = Instant::now();
    wait_for(
        "every simulated device connected",
        Duration::from_secs(1800),
        || async { (progress.connected.load(Ordering::Relaxed) == n as u64).then_some(()) },
    )
    .await?;
    let connected_after_s = started.elapsed().as_secs_f64();
    eprintln!("{n} devices connected after {connected_after_s:.0} s");

    // Idle: heartbeats and telemetry on the default timers.
    let idle_until = Instant::now() + Duration::from_secs(args.idle_secs);
    let lost_before_idle = progress.links_lost.load(Ordering::Relaxed);
    let idle = sample_while(pid, ticks, || async { Instant::now() >= idle_until }).await?;
    let lost_idle = progress.links_lost.load(Ordering::Relaxed) - lost_before_idle;
    eprintln!("idle sampled");

    // The OTA wave: every device in one phase.
    let image = kit.release_of_size("1.1.0", "normal", Some(args.image_size));
    cli.json(&["release", "publish", image.to_str().context("path")?]);
    let lost_before_wave = progress.links_lost.load(Ordering::Relaxed);
    let max_concurrent = args.max_concurrent.to_string();
    let rollout = cli.json(&[
        "rollout",
        "create",
        "1.1.0",
        "--all",
        "--phases",
        "100",
        "--max-concurrent",
        &max_concurrent,
    ]);
    let id = rollout["id"].as_str().context("rollout id")?.to_string();
    anyhow::ensure!(rollout["targetCount"] == n, "{rollout}");
    let last = std::sync::Mutex::new(Value::Null);
    let wave = sample_while(pid, ticks, || {
        let (server, jwt, id, last) = (&server, &jwt, &id, &last);
        async move {
            let Some(r) = server.rollout(jwt, id).await else {
                return false;
            };
            let state = r["progress"]["state"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            *last.lock().unwrap_or_else(|e| e.into_inner()) = r;
            state == "completed" || state == "stopped" || state == "aborted"
        }
    })
    .await?;
    let lost_wave = progress.links_lost.load(Ordering::Relaxed) - lost_before_wave;
    // Every device back on the broker, on the new image.
    let reconnected = wait_for(
        "every device connected again",
        Duration::from_secs(300),
        || async { (progress.connected.load(Ordering::Relaxed) == n as u64).then_some(()) },
    )
    .await
    .is_ok();

    let outcomes: Vec<Value> = server
        .database
        .updates_by_outcome(&id)
        .await?
        .into_iter()
        .map(|(state, error, count)| json!({"state": state, "error": error, "count": count}))
        .collect();

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("", |(_, model)| model.trim());
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "devices": n,
            "cpu": cpu,
            "cores": std::thread::available_parallelism().map_or(0, |c| c.get()),
            "image_bytes": args.image_size,
            "max_concurrent": max_concurrent,
            "connected_after_s": connected_after_s.round(),
            "idle": per_device(&idle, n),
            "idle_links_lost": lost_idle,
            "wave": per_device(&wave, n),
            "wave_links_lost": lost_wave,
            "wave_rollout": last.lock().unwrap_or_else(|e| e.into_inner())["progress"].clone(),
            "wave_updates_by_outcome": outcomes,
            "all_connected_after_wave": reconnected,
        }))?
    );
    Ok(())
}
