//! OTA download benchmark: N devices download a signed 1.5 MiB release at once from the
//! server's device listener (mutual TLS, one connection per device, as devices do), giving the
//! aggregate throughput and the server memory each active download holds. In the same run,
//! the ceiling: the same bytes over plain loopback TCP from memory, no TLS, no HTTP.
//!
//! Run (release build, see docs/benchmarks.md):
//!   cargo build --release --workspace --bins && target/release/ota-bench --devices 1000
//!
//! Prints one JSON object with every figure.

/// Every simulated device connects from this host, hundreds at once: the per-address cap on
/// arriving MQTT connections is for hosts that are not a fleet (an environment variable, so
/// builds from before the cap run the same bench).
const BENCH_ENV: &[(&str, &str)] = &[("FLOTILLA_MQTT_PER_ADDRESS", "1000000")];

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_e2e::bench::{enroll_all, rss_kib};
use flotilla_e2e::{DeviceIdentity, Server, bin};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

const IMAGE_SIZE: usize = 1536 * 1024;

struct Args {
    devices: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { devices: 1000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--devices" => a.devices = it.next().context("--devices N")?.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Makes a key, an agent image and its signed manifest with the real tools.
fn make_release(dir: &std::path::Path) -> Result<(String, Vec<u8>, Value)> {
    run(Command::new(bin("flotilla"))
        .args(["release", "keygen", "--out"])
        .arg(dir.join("release")))?;
    let image = dir.join("fw.bin");
    run(Command::new(bin("flotilla-agent"))
        .args([
            "image",
            "--version",
            "2.0.0",
            "--size",
            &IMAGE_SIZE.to_string(),
            "--out",
        ])
        .arg(&image))?;
    run(Command::new(bin("flotilla"))
        .args(["release", "sign"])
        .arg(&image)
        .args(["--version", "2.0.0", "--hardware", "esp32c3", "--key"])
        .arg(dir.join("release.key")))?;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("fw.bin.manifest.json"))?)?;
    Ok((
        dir.join("release.pub").display().to_string(),
        std::fs::read(image)?,
        manifest,
    ))
}

fn device_client(server: &Server, id: &DeviceIdentity) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem().as_bytes())?)
        .identity(reqwest::Identity::from_pem(
            format!("{}\n{}", id.cert_pem, id.key_pem).as_bytes(),
        )?)
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(300))
        .build()?)
}

/// Every client downloads the whole image at once; returns (seconds, bytes).
async fn download_all(clients: &[reqwest::Client], url: &str) -> Result<(f64, u64)> {
    let barrier = Arc::new(Barrier::new(clients.len() + 1));
    let mut tasks = Vec::new();
    for c in clients {
        let (c, url, barrier) = (c.clone(), url.to_string(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut resp = c.get(&url).send().await?.error_for_status()?;
            let mut n = 0u64;
            while let Some(chunk) = resp.chunk().await? {
                n += chunk.len() as u64;
            }
            anyhow::Ok(n)
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut bytes = 0;
    for t in tasks {
        let n = t.await??;
        anyhow::ensure!(n == IMAGE_SIZE as u64, "short download: {n}");
        bytes += n;
    }
    Ok((started.elapsed().as_secs_f64(), bytes))
}

/// From a server with no device connected, every client connects and starts a download, and
/// holds it open after its first chunk; returns the server's RSS growth per open download
/// (its TLS connection included), then lets them all finish.
async fn memory_per_download(clients: &[reqwest::Client], url: &str, pid: u32) -> Result<f64> {
    let idle = rss_kib(pid)?;
    let all_open = Arc::new(Barrier::new(clients.len() + 1));
    let release = Arc::new(Barrier::new(clients.len() + 1));
    let mut tasks = Vec::new();
    for c in clients {
        let (c, url) = (c.clone(), url.to_string());
        let (all_open, release) = (all_open.clone(), release.clone());
        tasks.push(tokio::spawn(async move {
            let mut resp = c.get(&url).send().await?.error_for_status()?;
            let first = resp.chunk().await?.map_or(0, |c| c.len());
            all_open.wait().await;
            release.wait().await;
            let mut n = first as u64;
            while let Some(chunk) = resp.chunk().await? {
                n += chunk.len() as u64;
            }
            anyhow::Ok(n)
        }));
    }
    all_open.wait().await;
    // Let the server fill its buffers up to the point where the stalled clients push back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active = rss_kib(pid)?;
    release.wait().await;
    for t in tasks {
        t.await??;
    }
    Ok(active.saturating_sub(idle) as f64 / clients.len() as f64)
}

/// The ceiling: the same transfers over plain loopback TCP from memory.
async fn plain_tcp(n: usize) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let image = Arc::new(vec![0x5Au8; IMAGE_SIZE]);
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let image = image.clone();
            tokio::spawn(async move {
                // Like an HTTP server: nothing is sent before the request.
                let mut request = [0u8; 1];
                if s.read_exact(&mut request).await.is_ok() {
                    let _ = s.write_all(&image).await;
                }
            });
        }
    });
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            barrier.wait().await;
            s.write_all(b"G").await?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                got += k;
            }
            anyhow::Ok(got)
        }));
    }
    barrier.wait().await;
    let started = Instant::now();
    let mut bytes = 0u64;
    for t in tasks {
        bytes += t.await?? as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    server.abort();
    Ok(bytes as f64 / secs)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let (public_key, image, manifest) = make_release(tmp.path())?;
    let server = Server::start_with_env(
        &["--release-key", &public_key, "--heartbeat-timeout", "600"],
        BENCH_ENV,
    )
    .await?;
    let admin = server.admin("bench@example.com").await?;
    let (s, b) = server
        .call("POST", "/api/releases", Some(&admin), Some(manifest))
        .await?;
    anyhow::ensure!(s == 201, "publish: {s} {b}");
    let resp = server
        .client
        .put(format!("{}/api/releases/2.0.0/image", server.http))
        .bearer_auth(&admin)
        .body(image)
        .send()
        .await?;
    anyhow::ensure!(resp.status() == 200, "upload: {}", resp.status());

    let t = Instant::now();
    let ids = enroll_all(&server, &admin, "ota", args.devices).await?;
    eprintln!(
        "enrolled {} devices in {:.1}s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );
    // Devices may download only what they were offered.
    let t = Instant::now();
    let offers: Vec<Result<u16>> = futures::stream::iter(ids.iter().map(|id| {
        let path = format!("/api/ota/{}/start", id.device_id);
        let admin = admin.clone();
        let server = &server;
        async move {
            Ok(server
                .call(
                    "POST",
                    &path,
                    Some(&admin),
                    Some(json!({ "version": "2.0.0" })),
                )
                .await?
                .0)
        }
    }))
    .buffer_unordered(16)
    .collect()
    .await;
    for s in offers {
        anyhow::ensure!(s? == 202, "offer refused");
    }
    let offers_per_s = ids.len() as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "offered the release to {} devices ({offers_per_s:.0}/s)",
        ids.len()
    );
    let clients = ids
        .iter()
        .map(|id| device_client(&server, id))
        .collect::<Result<Vec<_>>>()?;
    let url = format!("{}/firmware/2.0.0", server.backend_url());

    let pid = server.proc.0.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kib = memory_per_download(&clients, &url, pid).await?;
    eprintln!("flotilla: {kib:.1} KiB per active download");
    let ceiling = plain_tcp(args.devices).await?;
    eprintln!("plain TCP ceiling: {:.2} GB/s", ceiling / 1e9);
    let (secs, bytes) = download_all(&clients, &url).await?;
    let throughput = bytes as f64 / secs;
    eprintln!("flotilla: {:.2} GB/s", throughput / 1e9);
    let report = json!({
        "devices": args.devices,
        "image_bytes": IMAGE_SIZE,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "flotilla": {
            "concurrent_downloads": args.devices,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "aggregate_gb_per_s": (throughput / 1e7).round() / 100.0,
            "server_kib_per_active_download": (kib * 10.0).round() / 10.0,
            "api_offers_per_s": offers_per_s.round(),
        },
        "plain_tcp_ceiling_gb_per_s": (ceiling / 1e7).round() / 100.0,
        "share_of_ceiling": ((throughput / ceiling) * 100.0).round() / 100.0,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
