//! `flotilla-agent sim`: N virtual devices in one process, provisioned in bulk through the
//! API with one token each, each with its own flash directory, key and mTLS connection.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use flotilla_device_core::ProvisionRequest;
use serde_json::json;

use crate::DeviceFlags;
use crate::nvs::Nvs;
use crate::runner::{DeviceHandle, Exit, LINKS_LOST, Runner};

#[derive(Args, Debug, Clone)]
pub struct SimFlags {
    /// How many devices.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Device ids are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// The user API, to create provisioning tokens.
    #[arg(
        long,
        env = "FLOTILLA_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    api_url: String,
    #[arg(long, env = "FLOTILLA_EMAIL")]
    email: String,
    #[arg(long, env = "FLOTILLA_PASSWORD")]
    password: String,
    /// Print a JSON progress line this often.
    #[arg(long, default_value_t = 1)]
    report_secs: u64,
    /// Exit once every device is connected (for benchmarks), after printing the time it took.
    #[arg(long)]
    exit_when_connected: bool,
}

pub async fn run(device: DeviceFlags, flags: SimFlags) -> anyhow::Result<()> {
    let env = device.env()?;
    let api = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = flags.api_url.trim_end_matches('/').to_string();
    let login: serde_json::Value = api
        .post(format!("{base}/api/auth/login"))
        .json(&json!({ "email": flags.email, "password": flags.password }))
        .send()
        .await?
        .error_for_status()
        .context("logging in")?
        .json()
        .await?;
    let jwt = login["token"]
        .as_str()
        .context("login returned no token")?
        .to_string();

    let started = Instant::now();
    let mut handles: Vec<DeviceHandle> = Vec::with_capacity(flags.count);
    for i in 0..flags.count {
        let id = format!("{}-{i:05}", flags.prefix);
        let nvs = Nvs::open(&device.data_dir.join(&id))?;
        let fresh = nvs.load().provisioning.is_none();
        let (runner, handle) = Runner::power_on(env.clone(), nvs, id.clone()).await?;
        spawn_forever(
            runner,
            handle.clone(),
            env.clone(),
            device.data_dir.join(&id),
            id.clone(),
        );
        if fresh {
            let token: serde_json::Value = api
                .post(format!("{base}/api/provisioning/tokens"))
                .bearer_auth(&jwt)
                .json(&json!({ "deviceId": id }))
                .send()
                .await?
                .error_for_status()
                .context("creating a provisioning token")?
                .json()
                .await?;
            let request = ProvisionRequest {
                ssid: env
                    .networks
                    .first()
                    .map(|n| n.ssid.clone())
                    .unwrap_or_default(),
                password: String::new(),
                device_id: id.clone(),
                provisioning_token: token["token"].as_str().context("no token")?.to_string(),
            };
            handle
                .provision(request, Some(jwt.clone()))
                .await
                .map_err(|e| anyhow::anyhow!("provisioning {id}: {e:?}"))?;
        }
        handles.push(handle);
    }
    let provisioned_ms = started.elapsed().as_millis();
    println!(
        "{}",
        json!({ "event": "started", "devices": flags.count, "elapsed_ms": provisioned_ms })
    );

    let mut tick = tokio::time::interval(Duration::from_secs(flags.report_secs.max(1)));
    loop {
        tick.tick().await;
        let mut connected = 0;
        for h in &handles {
            if h.status().await.is_some_and(|s| s.status == "connected") {
                connected += 1;
            }
        }
        println!(
            "{}",
            json!({
                "event": "progress",
                "connected": connected,
                "devices": flags.count,
                "links_lost": LINKS_LOST.load(std::sync::atomic::Ordering::Relaxed),
                "elapsed_ms": started.elapsed().as_millis(),
            })
        );
        if flags.exit_when_connected && connected == flags.count {
            println!(
                "{}",
                json!({ "event": "all_connected", "devices": flags.count, "elapsed_ms": started.elapsed().as_millis() })
            );
            return Ok(());
        }
    }
}

/// Runs a virtual device; a reboot restarts it from its flash, as on the chip, and `handle`
/// follows it to the new boot.
fn spawn_forever(
    first: Runner,
    handle: DeviceHandle,
    env: crate::runner::DeviceEnv,
    dir: std::path::PathBuf,
    label: String,
) {
    tokio::spawn(async move {
        let mut exit = first.run().await;
        while exit == Exit::Reboot {
            let Ok(nvs) = Nvs::open(&dir) else { return };
            let (runner, next) = match Runner::power_on(env.clone(), nvs, label.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(device = %label, error = %e, "boot failed");
                    return;
                }
            };
            handle.follow(&next);
            exit = runner.run().await;
        }
    });
}
