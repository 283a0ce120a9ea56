//! Certificate renewal, the device's side: a fresh key made here (it never leaves the
//! device), a CSR for it sent to `/renew` over mTLS with the current certificate, and the new
//! pair kept apart ([`Nvs::store_next_key`]) until a connection with it succeeds. Then
//! `/renew/confirm`, presenting the new certificate, tells a server that cannot see the
//! broker's connections (an external broker) that the old one can go.

use std::time::Duration;

use serde_json::json;

use crate::nvs::{Credentials, Nvs};
use crate::runner::DeviceEnv;

/// Why a renewal did not happen.
#[derive(Debug)]
pub enum RenewFailure {
    /// Try again later; the server may say when (429 `Retry-After`).
    Later { retry_after: Option<Duration> },
    /// The server will not renew this certificate (revoked, superseded, blocked): a later try
    /// may still succeed once an operator acts, so it is retried, slowly.
    Refused(String),
}

/// HTTPS presenting `credentials`, trusting only the baked-in CA; the caller adds timeouts.
pub fn mtls_builder(
    env: &DeviceEnv,
    credentials: &Credentials,
) -> anyhow::Result<reqwest::ClientBuilder> {
    let identity = reqwest::Identity::from_pem(
        format!("{}\n{}", credentials.cert, credentials.key).as_bytes(),
    )?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(
            env.server_ca_pem.as_bytes(),
        )?)
        .identity(identity)
        .connect_timeout(Duration::from_secs(10)))
}

/// A client for the short requests of a renewal.
fn client_with(env: &DeviceEnv, credentials: &Credentials) -> anyhow::Result<reqwest::Client> {
    Ok(mtls_builder(env, credentials)?
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn later(why: impl std::fmt::Display) -> RenewFailure {
    tracing::warn!(error = %why, "certificate renewal failed");
    RenewFailure::Later { retry_after: None }
}

/// Asks for a certificate for a fresh key; on success the pair waits in NVS as the next one.
pub async fn renew(env: &DeviceEnv, nvs: &Nvs, device_id: &str) -> Result<(), RenewFailure> {
    let current = nvs.credentials().ok_or_else(|| later("no certificate"))?;
    let client = client_with(env, &current).map_err(later)?;
    let (key, csr) = flotilla_pki::device_key_and_csr(device_id).map_err(later)?;
    nvs.store_next_key(&key).map_err(later)?;
    let url = format!("{}/renew", env.backend_url.trim_end_matches('/'));
    let response = client
        .post(&url)
        .json(&json!({ "csr": csr }))
        .send()
        .await
        .map_err(later)?;
    let status = response.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        return Err(RenewFailure::Later { retry_after });
    }
    if status.is_client_error() {
        let body = response.text().await.unwrap_or_default();
        return Err(RenewFailure::Refused(format!(
            "{status}: {}",
            flotilla_proto::truncate_chars(&body, 200)
        )));
    }
    if !status.is_success() {
        return Err(later(status));
    }
    let body: serde_json::Value = response.json().await.map_err(later)?;
    let cert = body["certificate"]["content"]
        .as_str()
        .ok_or_else(|| later("no certificate in the answer"))?;
    // Only a certificate for this device and the key just made is worth keeping.
    match flotilla_pki::certificate_identity(cert) {
        Some((_, cn)) if cn == device_id => {}
        _ => {
            return Err(RenewFailure::Refused(
                "certificate names another device".into(),
            ));
        }
    }
    nvs.store_next_cert(cert).map_err(later)?;
    tracing::info!(device_id, "renewed certificate stored; connecting with it");
    Ok(())
}

/// Presents `credentials` to `/renew/confirm`: `Ok(true)` if the server now holds them as the
/// device's current certificate, `Ok(false)` if it refuses them (revoked, never issued).
pub async fn confirm_with(env: &DeviceEnv, credentials: &Credentials) -> anyhow::Result<bool> {
    let url = format!("{}/renew/confirm", env.backend_url.trim_end_matches('/'));
    let status = client_with(env, credentials)?
        .post(&url)
        .send()
        .await?
        .status();
    match status {
        s if s.is_success() => Ok(true),
        reqwest::StatusCode::FORBIDDEN | reqwest::StatusCode::UNAUTHORIZED => Ok(false),
        s => anyhow::bail!("confirm answered {s}"),
    }
}

/// Tells the server the renewed certificate, now the device's own, is in use.
pub async fn confirm(env: &DeviceEnv, nvs: &Nvs) -> anyhow::Result<()> {
    let current = nvs
        .credentials()
        .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
    anyhow::ensure!(
        confirm_with(env, &current).await?,
        "the server refused the certificate"
    );
    nvs.confirmed();
    Ok(())
}
