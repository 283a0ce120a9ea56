//! SUBMIT_CSR: make the device key on first use (it never leaves the device), send a CSR with
//! the one-time token to `/sign-csr`, store the certificate and CA.

use flotilla_device_core::CsrFailure;
use serde_json::json;

use crate::nvs::{CA_FILE, CERT_FILE, KEY_FILE, Nvs};
use crate::runner::DeviceEnv;

pub async fn submit(
    env: &DeviceEnv,
    nvs: &Nvs,
    device_id: &str,
    token: &str,
) -> Result<(), CsrFailure> {
    let csr = match nvs.read_string(KEY_FILE) {
        Some(key) => {
            flotilla_pki::csr_for_key_pem(&key, device_id).map_err(|_| CsrFailure::Transient)?
        }
        None => {
            let (key, csr) =
                flotilla_pki::device_key_and_csr(device_id).map_err(|_| CsrFailure::Transient)?;
            nvs.write_atomic(KEY_FILE, key.as_bytes(), true)
                .map_err(|_| CsrFailure::Transient)?;
            csr
        }
    };
    let url = format!("{}/sign-csr", env.backend_url.trim_end_matches('/'));
    let response = env
        .http
        .post(&url)
        .bearer_auth(token)
        .json(&json!({ "device_id": device_id, "csr": csr }))
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(device_id, error = %e, "CSR submission failed");
            CsrFailure::Transient
        })?;
    let status = response.status();
    if let Some(failure) = CsrFailure::from_status(status.as_u16()) {
        let body = response.text().await.unwrap_or_default();
        tracing::warn!(device_id, %status, ?failure, body = %flotilla_proto::truncate_chars(&body, 200), "CSR not signed");
        return Err(failure);
    }
    let body: serde_json::Value = response.json().await.map_err(|_| CsrFailure::Transient)?;
    let cert = body["certificate"]["content"]
        .as_str()
        .ok_or(CsrFailure::Transient)?;
    let ca = body["ca_certificate"]["content"]
        .as_str()
        .ok_or(CsrFailure::Transient)?;
    // The CA must be the one baked into the firmware: a device never learns to trust a new
    // root from the network.
    if normalize(ca) != normalize(&env.server_ca_pem) {
        tracing::error!(
            device_id,
            "server returned a CA that differs from the baked-in one"
        );
        return Err(CsrFailure::Refused);
    }
    nvs.write_atomic(CA_FILE, ca.as_bytes(), false)
        .map_err(|_| CsrFailure::Transient)?;
    nvs.write_atomic(CERT_FILE, cert.as_bytes(), false)
        .map_err(|_| CsrFailure::Transient)?;
    tracing::info!(device_id, "certificate stored");
    Ok(())
}

fn normalize(pem: &str) -> String {
    pem.split_whitespace().collect()
}
