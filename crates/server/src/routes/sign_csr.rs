//! `POST /sign-csr` on the device listener (seed 004): a one-time provisioning token buys
//! exactly one certificate for the key in the CSR.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use flotilla_proto::DeviceId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::provisioning::token_hash;
use crate::app::AppState;
use crate::error::{ApiError, ApiResult, JsonBody};
use crate::store::{AuditRecord, TokenClaim};

pub fn router() -> Router<AppState> {
    Router::new().route("/sign-csr", post(sign_csr))
}

#[derive(Deserialize)]
struct SignCsr {
    device_id: String,
    csr: String,
}

async fn sign_csr(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SignCsr>,
) -> ApiResult<Json<Value>> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 512);
    let device_label = flotilla_proto::truncate_chars(&body.device_id, 64).to_string();
    let actor = format!("device:{device_label}");
    let audit = |result: &'static str, detail: String| {
        let state = state.clone();
        let actor = actor.clone();
        let target = device_label.clone();
        async move {
            state
                .store
                .audit(AuditRecord {
                    actor: &actor,
                    action: "certificate.issue",
                    target: Some(&target),
                    result,
                    detail: Some(detail),
                })
                .await;
        }
    };
    let Some(token) = token else {
        audit("failure", "no provisioning token".into()).await;
        return Err(ApiError::Unauthorized);
    };
    let device = match DeviceId::parse(&body.device_id) {
        Ok(d) => d,
        Err(e) => {
            audit("failure", format!("bad device_id: {e}")).await;
            return Err(ApiError::bad(format!("device_id: {e}")));
        }
    };
    if body.csr.len() > 8 * 1024 {
        audit("failure", "CSR too large".into()).await;
        return Err(ApiError::bad("csr must be at most 8 KiB of PEM"));
    }
    // Sign first (this verifies the CSR); the certificate is only released if the token is
    // redeemed, and a refused token leaves nothing behind.
    let issued = match state.ca.sign_device_csr(&body.csr, device.as_str()) {
        Ok(c) => c,
        Err(e) => {
            audit("failure", e.to_string()).await;
            return Err(ApiError::bad(e.to_string()));
        }
    };
    match state
        .store
        .redeem_token(&token_hash(token), device.as_str(), &issued)
        .await?
    {
        TokenClaim::Claimed { owner_id } => {
            state.gate.set_serial(device.as_str(), &issued.serial_hex);
            // Any session still using an older certificate is now revoked: close it.
            state.broker.kick(device.as_str()).await;
            audit(
                "success",
                format!("serial {} owner {owner_id}", issued.serial_hex),
            )
            .await;
            Ok(Json(json!({
                "certificate": { "content": issued.certificate_pem },
                "ca_certificate": { "content": state.ca.certificate_pem() },
            })))
        }
        TokenClaim::Invalid => {
            audit("failure", "token unknown, used or expired".into()).await;
            Err(ApiError::Unauthorized)
        }
        TokenClaim::WrongDevice => {
            audit("failure", "token bound to another device".into()).await;
            Err(ApiError::Forbidden("token is bound to another device id"))
        }
        TokenClaim::DeviceTaken => {
            audit("failure", "device id owned by another account".into()).await;
            Err(ApiError::Conflict(
                "device id is registered to another account".into(),
            ))
        }
    }
}
