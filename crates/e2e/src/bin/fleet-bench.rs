//! Fleet benchmark: full mTLS connects per second, server memory per connected device, and
//! telemetry messages per second durably stored — against flotilla-server, and the same
//! connection and publish load against Mosquitto with the same certificates, in the same run.
//!
//! Run (release build, see docs/benchmarks.md):
//!   cargo build --release --workspace --bins && target/release/fleet-bench --devices 10000
//!
//! Prints one JSON object with every figure.

/// Every simulated device connects from this host, hundreds at once: the per-address cap on
/// arriving MQTT connections is for hosts that are not a fleet (an environment variable, so
/// builds from before the cap run the same bench).
const BENCH_ENV: &[(&str, &str)] = &[("FLOTILLA_MQTT_PER_ADDRESS", "1000000")];

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_e2e::bench::{connect_all, enroll_all, publish_burst_ids, rss_kib};
use flotilla_e2e::{Proc, Server, wait_for};
use serde_json::{Value, json};

struct Args {
    devices: usize,
    telemetry_devices: usize,
    messages_per_device: usize,
    concurrency: usize,
    mosquitto: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        devices: 1000,
        telemetry_devices: 1000,
        messages_per_device: 50,
        concurrency: 128,
        mosquitto: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("flag needs a value");
        match flag.as_str() {
            "--devices" => a.devices = value()?.parse()?,
            "--telemetry-devices" => a.telemetry_devices = value()?.parse()?,
            "--messages-per-device" => a.messages_per_device = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "--no-mosquitto" => a.mosquitto = false,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    a.telemetry_devices = a.telemetry_devices.min(a.devices);
    Ok(a)
}

fn start_mosquitto(dir: &Path, server: &Server) -> Result<(Proc, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let data = server.data_dir();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\nmax_connections -1\npersistence false\nlog_type error\n# Read the 0600 server key as its owner instead of dropping to the mosquitto user.\nuser {}\n",
            data.join("ca.pem").display(),
            data.join("server.pem").display(),
            data.join("server.key").display(),
            std::env::var("USER").unwrap_or_else(|_| "root".into()),
        ),
    )?;
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto")?;
    Ok((Proc(child), port))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let server = Server::start_with_env(&["--heartbeat-timeout", "600"], BENCH_ENV).await?;
    let admin = server.admin("bench@example.com").await?;
    let t = Instant::now();
    let ids = enroll_all(&server, &admin, "bench", args.devices).await?;
    eprintln!(
        "enrolled {} devices in {:.1}s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );

    let mut report = json!({
        "devices": args.devices,
        "concurrency": args.concurrency,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        // FLOTILLA_E2E_DATABASE=postgres runs the server on a fresh PostgreSQL database.
        "database": if server.database.is_postgres() { "postgres" } else { "sqlite" },
    });

    // --- flotilla-server ---
    let pid = server.proc.0.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(pid)?;
    let (conns, rate) = connect_all(server.mqtt_port, &ids, args.concurrency).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid)?;
    report["flotilla"] = json!({
        "mtls_connects_per_s": rate.round(),
        "rss_before_kib": rss_before,
        "rss_connected_kib": rss_after,
        "kib_per_connected_device": ((rss_after.saturating_sub(rss_before)) as f64 / args.devices as f64 * 100.0).round() / 100.0,
    });
    eprintln!("flotilla: {report}");

    let m = args.telemetry_devices;
    let per = args.messages_per_device;
    let total = (m * per) as i64;
    let stats_before = server
        .call("GET", "/api/admin/stats", Some(&admin), None)
        .await?
        .1["telemetryRows"]
        .as_i64()
        .unwrap_or(0);
    let started = Instant::now();
    let publish_s = publish_burst_ids(&conns[..m], &ids[..m], per, 0).await?;
    let stored = wait_for("all telemetry stored", Duration::from_secs(120), || async {
        let (_, s) = server
            .call("GET", "/api/admin/stats", Some(&admin), None)
            .await
            .ok()?;
        let stored = s["telemetryRows"].as_i64()? - stats_before;
        eprintln!("stored {stored}/{total}");
        (stored >= total).then_some(())
    })
    .await;
    let stored_s = started.elapsed().as_secs_f64();
    if stored.is_err() {
        let log = server.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!(
            "telemetry not all stored; server log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    report["flotilla"]["telemetry"] = json!({
        "devices": m, "messages": total,
        "published_and_acked_per_s": (total as f64 / publish_s).round(),
        "durably_stored_per_s": if stored.is_ok() { (total as f64 / stored_s).round() } else { 0.0 },
    });
    eprintln!("flotilla telemetry: {}", report["flotilla"]["telemetry"]);
    drop(conns);
    // Let the aborted tasks release their sockets: one process holds at most ~20,000.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // --- Mosquitto, same certificates, same load ---
    if args.mosquitto {
        let (mut mosq, port) = start_mosquitto(server.dir.path(), &server)?;
        wait_for(
            "mosquitto listening",
            Duration::from_secs(10),
            || async move {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        )
        .await?;
        let mpid = mosq.0.id();
        let rss_before = rss_kib(mpid)?;
        let (conns, rate) = connect_all(port, &ids, args.concurrency).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_after = rss_kib(mpid)?;
        let publish_s = publish_burst_ids(&conns[..m], &ids[..m], per, 0).await?;
        report["mosquitto"] = json!({
            "mtls_connects_per_s": rate.round(),
            "kib_per_connected_device": ((rss_after.saturating_sub(rss_before)) as f64 / args.devices as f64 * 100.0).round() / 100.0,
            "telemetry_published_and_acked_per_s": (total as f64 / publish_s).round(),
        });
        let f = &report["flotilla"];
        let q = &report["mosquitto"];
        let ratio = |a: &Value, b: &Value| {
            (a.as_f64().unwrap_or(0.0) / b.as_f64().unwrap_or(1.0).max(1e-9) * 100.0).round()
                / 100.0
        };
        report["ratio_flotilla_to_mosquitto"] = json!({
            "connects_per_s": ratio(&f["mtls_connects_per_s"], &q["mtls_connects_per_s"]),
            "kib_per_device": ratio(&f["kib_per_connected_device"], &q["kib_per_connected_device"]),
            "telemetry_acked_per_s": ratio(&f["telemetry"]["published_and_acked_per_s"], &q["telemetry_published_and_acked_per_s"]),
        });
        drop(conns);
        mosq.kill_hard();
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
