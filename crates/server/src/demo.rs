//! `--demo N`: a fleet of virtual devices beside the server, so one command shows the whole
//! platform working. The devices are ordinary `flotilla-agent sim` devices: they provision
//! through the API and `/sign-csr` and connect with mTLS like any other.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::server::Endpoints;
use flotilla_store::{AuditRecord, Role, Store};

pub const DEMO_EMAIL: &str = "demo@flotilla.local";

/// Creates the demo account on first use (random password, written owner-only to the data
/// dir, never logged) and starts the fleet. The returned child is killed when dropped.
pub async fn start(
    store: &Store,
    data: &Path,
    endpoints: &Endpoints,
    devices: usize,
) -> anyhow::Result<tokio::process::Child> {
    let creds_path = data.join("demo-credentials.json");
    let password = match std::fs::read(&creds_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    {
        Some(c) if store.user_by_email(DEMO_EMAIL).await?.is_some() => {
            c["password"].as_str().unwrap_or_default().to_string()
        }
        _ => {
            let password = hex::encode(rand::random::<[u8; 12]>());
            let hash = crate::passwords::hash_password(&password)?;
            store
                .create_user("demo", DEMO_EMAIL, &hash, Role::Operator)
                .await
                .context("creating the demo account")?;
            store
                .audit(AuditRecord {
                    actor: "server:demo",
                    action: "user.register",
                    target: Some(DEMO_EMAIL),
                    result: "success",
                    detail: None,
                })
                .await;
            let creds = json!({ "email": DEMO_EMAIL, "password": password });
            flotilla_pki::write_secret_file(&creds_path, &serde_json::to_vec_pretty(&creds)?)?;
            password
        }
    };
    let agent = std::env::current_exe()?.with_file_name("flotilla-agent");
    anyhow::ensure!(
        agent.exists(),
        "--demo needs flotilla-agent next to flotilla-server ({}); build it with `cargo build --workspace --bins`",
        agent.display()
    );
    let loopback = |addr: std::net::SocketAddr| {
        if addr.ip().is_unspecified() {
            std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        } else {
            addr
        }
    };
    let child = tokio::process::Command::new(agent)
        .arg("--data-dir")
        .arg(data.join("demo-fleet"))
        .arg("--server-ca")
        .arg(data.join(flotilla_pki::CA_CERT_FILE))
        .args([
            "--backend-url",
            &format!("https://localhost:{}", endpoints.device.port()),
        ])
        .args([
            "--broker-url",
            &format!("mqtts://localhost:{}", endpoints.mqtt.port()),
        ])
        .args([
            "sim",
            "--count",
            &devices.to_string(),
            "--prefix",
            "demo",
            "--email",
            DEMO_EMAIL,
        ])
        .args(["--api-url", &format!("http://{}", loopback(endpoints.http))])
        // The password travels in the environment, not on the command line other users can read.
        .env("FLOTILLA_PASSWORD", &password)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the demo fleet")?;
    tracing::info!(devices, account = DEMO_EMAIL, credentials = %creds_path.display(), "demo fleet started");
    Ok(child)
}
