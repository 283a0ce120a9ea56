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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_e2e::bench::{enroll_all, rss_kib};
use flotilla_e2e::{DeviceIdentity, Proc, Server, wait_for};
use futures::StreamExt;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
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

/// One connected device: its client, plus a counter of PUBACKs received.
struct Conn {
    client: AsyncClient,
    acks: Arc<AtomicU64>,
    /// The task polling the connection; aborting it closes the socket.
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

async fn connect_one(port: u16, id: &DeviceIdentity) -> Result<Conn> {
    let mut o = MqttOptions::new(&id.device_id, "localhost", port);
    o.set_keep_alive(Duration::from_secs(120));
    o.set_connection_timeout(60);
    let mut net = o.network_options();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    // rumqttc otherwise sizes its in-flight table for 65,535 publishes: ~10 MB per client.
    o.set_outgoing_inflight_upper_limit(100);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: id.ca_pem.as_bytes().to_vec(),
        alpn: None,
        client_auth: Some((
            id.cert_pem.as_bytes().to_vec(),
            id.key_pem.as_bytes().to_vec(),
        )),
    }));
    let (client, mut eventloop) = AsyncClient::new(o, 128);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                break;
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => anyhow::bail!("refused: {:?}", ack.code),
            Ok(_) => {}
            Err(e) => anyhow::bail!("{}: {e}", id.device_id),
        }
    }
    let acks = Arc::new(AtomicU64::new(0));
    let counter = acks.clone();
    let pump = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok(Conn { client, acks, pump })
}

/// Connects every identity with `concurrency` handshakes in flight; returns the connections and
/// the connects per second.
async fn connect_all(
    port: u16,
    ids: &[DeviceIdentity],
    concurrency: usize,
) -> Result<(Vec<Conn>, f64)> {
    let started = Instant::now();
    let results: Vec<Result<Conn>> =
        futures::stream::iter(ids.iter().map(|id| connect_one(port, id)))
            .buffered(concurrency) // ordered: conns[i] belongs to ids[i]
            .collect()
            .await;
    let elapsed = started.elapsed().as_secs_f64();
    let conns: Vec<Conn> = results.into_iter().collect::<Result<_>>()?;
    Ok((conns, ids.len() as f64 / elapsed))
}

/// Device i of `conns` (identity `ids[i]`) publishes `per_device` QoS 1 telemetry messages;
/// returns the seconds until every PUBACK arrived.
async fn publish_burst_ids(
    conns: &[Conn],
    ids: &[DeviceIdentity],
    per_device: usize,
    seq_base: u64,
) -> Result<f64> {
    let before: Vec<u64> = conns
        .iter()
        .map(|c| c.acks.load(Ordering::Relaxed))
        .collect();
    let started = Instant::now();
    let sends = conns.iter().zip(ids).map(|(c, id)| async move {
        let topic = format!("devices/{}/telemetry", id.device_id);
        for i in 0..per_device {
            let payload =
                json!({ "seq": seq_base + i as u64, "pot": 1841, "switch": true, "temp": 21.5 })
                    .to_string();
            c.client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await?;
        }
        anyhow::Ok(())
    });
    futures::future::try_join_all(sends).await?;
    eprintln!(
        "published {} messages in {:.2}s",
        conns.len() * per_device,
        started.elapsed().as_secs_f64()
    );
    wait_for("every PUBACK", Duration::from_secs(120), || {
        let acked: u64 = conns
            .iter()
            .zip(&before)
            .map(|(c, b)| c.acks.load(Ordering::Relaxed) - b)
            .sum();
        let done = acked >= (conns.len() * per_device) as u64;
        async move { done.then_some(()) }
    })
    .await?;
    Ok(started.elapsed().as_secs_f64())
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
