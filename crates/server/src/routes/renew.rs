//! `POST /renew` and `POST /renew/confirm` on the device listener: a device renews its
//! certificate over mTLS with the one it holds and a CSR for a key it made (the key never
//! leaves it), then confirms the new one by presenting it. The device id comes from the
//! certificate, never from the body.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use flotilla_proto::DeviceId;
use flotilla_store::{AuditRecord, Promotion, RenewalRefusal};
use serde::Deserialize;
use serde_json::json;

use super::sign_csr::{certificate_answer, refresh_gate, sign};
use crate::app::AppState;
use crate::device_listener::PeerIdentity;
use crate::error::{ApiError, JsonBody};
use crate::renewal::{min_renewal_interval, promote};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/renew", post(renew))
        .route("/renew/confirm", post(confirm))
}

#[derive(Deserialize)]
struct Renew {
    csr: String,
}

/// The device a verified client certificate names, with its serial.
fn presenting_device(peer: &PeerIdentity) -> Result<(DeviceId, String), ApiError> {
    let Some((serial, cn)) = &peer.0 else {
        return Err(ApiError::Unauthorized);
    };
    let device =
        DeviceId::parse(cn).map_err(|_| ApiError::Forbidden("not a device certificate"))?;
    Ok((device, serial.clone()))
}

async fn audit(state: &AppState, device: &DeviceId, action: &str, result: &str, detail: String) {
    let actor = format!("device:{device}");
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action,
            target: Some(device.as_str()),
            result,
            detail: Some(detail),
        })
        .await;
}

fn refused(refusal: RenewalRefusal) -> Response {
    match refusal {
        RenewalRefusal::NotCurrent => {
            ApiError::Forbidden("only the device's current certificate can be renewed")
                .into_response()
        }
        RenewalRefusal::Blocked => ApiError::Forbidden("device is blocked").into_response(),
        RenewalRefusal::TooSoon { retry_after_ms } => {
            let secs = (retry_after_ms + 999) / 1000;
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(json!({ "error": "this device renewed its certificate recently; try again later" })),
            )
                .into_response()
        }
    }
}

async fn renew(
    State(state): State<AppState>,
    Extension(peer): Extension<PeerIdentity>,
    JsonBody(body): JsonBody<Renew>,
) -> Result<Response, ApiError> {
    let (device, serial) = presenting_device(&peer)?;
    let min_interval = min_renewal_interval(state.config.device_cert_validity()).as_millis() as i64;
    let fail = |detail: String| audit(&state, &device, "certificate.renew", "failure", detail);
    if body.csr.len() > 8 * 1024 {
        fail("CSR too large".into()).await;
        return Err(ApiError::bad("csr must be at most 8 KiB of PEM"));
    }
    // Refusals first, so a device that may not renew costs no signature.
    let refusal = match state
        .store
        .renewal_refusal(&device, &serial, min_interval)
        .await
    {
        Err(flotilla_store::StoreError::NotFound) => {
            return Err(ApiError::Forbidden("device certificate not accepted"));
        }
        other => other?,
    };
    if let Err(refusal) = refusal {
        fail(format!("serial {serial}: {refusal:?}")).await;
        return Ok(refused(refusal));
    }
    let issued = match sign(&state, &body.csr, &device) {
        Ok(c) => c,
        Err(e) => {
            fail(e.clone()).await;
            return Err(ApiError::bad(e));
        }
    };
    if let Err(refusal) = state
        .store
        .renew_device_certificate(&device, &serial, &issued, min_interval)
        .await?
    {
        fail(format!("serial {serial}: {refusal:?}")).await;
        return Ok(refused(refusal));
    }
    refresh_gate(&state, &device).await;
    audit(
        &state,
        &device,
        "certificate.renew",
        "success",
        format!("serial {} renews {serial}", issued.serial_hex),
    )
    .await;
    Ok(Json(certificate_answer(&state, &issued)).into_response())
}

/// The device presents the certificate it was issued by renewal: that one becomes current.
async fn confirm(
    State(state): State<AppState>,
    Extension(peer): Extension<PeerIdentity>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (device, serial) = presenting_device(&peer)?;
    match promote(&state.store, &state.gate, &device, &serial, "confirmed").await? {
        Promotion::Promoted { .. } => Ok(Json(json!({ "serial": serial, "promoted": true }))),
        Promotion::AlreadyCurrent => Ok(Json(json!({ "serial": serial, "promoted": false }))),
        Promotion::Unknown => Err(ApiError::Forbidden("device certificate not accepted")),
    }
}
