//! `POST /sign-csr` on the device listener (seed 004): a one-time provisioning token buys
//! exactly one certificate for the key in the CSR.
//!
//! Anonymous callers are cheap to refuse: the token is checked (one indexed read) before any
//! signing, failures are counted per source address, and an address past the limit is
//! refused before any work with one audit row for the whole flood.

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
use crate::routes::ClientAddr;
use crate::shared_limits::{Anonymous, and_shared};
use flotilla_pki::IssuedCertificate;
use flotilla_store::{AuditRecord, TokenClaim};

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
    ClientAddr(from): ClientAddr,
    headers: HeaderMap,
    JsonBody(body): JsonBody<SignCsr>,
) -> ApiResult<Json<Value>> {
    let token = crate::auth::bearer(&headers).filter(|t| !t.is_empty() && t.len() <= 512);
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
    let now = std::time::Instant::now();
    let shared = state
        .shared_limits
        .as_ref()
        .map(|s| s.begin_anonymous(Anonymous::SignCsr, from));
    if let Err(refused) = and_shared(state.anonymous.begin(from, now), shared).await {
        if refused.first {
            let from = from.map_or_else(|| "unknown".into(), |a| a.to_string());
            audit(
                "failure",
                format!("address {from} refused: too many failed requests"),
            )
            .await;
        }
        return Err(ApiError::TooManyRequests);
    }
    // The attempt is counted from here; only a certificate issued gives the count back.
    let fail = |detail: String| audit("failure", detail);
    let Some(token) = token else {
        fail("no provisioning token".into()).await;
        return Err(ApiError::Unauthorized);
    };
    let device = match DeviceId::parse(&body.device_id) {
        Ok(d) => d,
        Err(e) => {
            fail(format!("bad device_id: {e}")).await;
            return Err(ApiError::bad(format!("device_id: {e}")));
        }
    };
    if body.csr.len() > 8 * 1024 {
        fail("CSR too large".into()).await;
        return Err(ApiError::bad("csr must be at most 8 KiB of PEM"));
    }
    // The token first: nothing is signed for a caller who could not redeem it.
    let token_hash = token_hash(token);
    if let Some(refusal) = refusal(state.store.peek_token(&token_hash, &device).await?) {
        fail(refusal.0.into()).await;
        return Err(refusal.1);
    }
    // Signing verifies the CSR; the certificate is only released if the token is redeemed,
    // and a refused token leaves nothing behind.
    let issued = match sign(&state, &body.csr, &device) {
        Ok(c) => c,
        Err(e) => {
            fail(e.clone()).await;
            return Err(ApiError::bad(e));
        }
    };
    match state
        .store
        .redeem_token(&token_hash, &device, &issued)
        .await?
    {
        TokenClaim::Claimed { owner_id } => {
            state.anonymous.succeeded(from);
            if let Some(shared) = &state.shared_limits {
                shared.anonymous_succeeded(Anonymous::SignCsr, from).await;
            }
            refresh_gate(&state, &device).await;
            // Any session still using an older certificate is now revoked: close it.
            state.broker.kick(device.as_str()).await;
            audit(
                "success",
                format!("serial {} owner {owner_id}", issued.serial_hex),
            )
            .await;
            Ok(Json(certificate_answer(&state, &issued)))
        }
        claim => {
            let (detail, error) =
                refusal(claim).unwrap_or(("token claimed concurrently", ApiError::Unauthorized));
            fail(detail.into()).await;
            Err(error)
        }
    }
}

/// Signs a device's CSR for the configured validity; the error says what is wrong with it.
pub(super) fn sign(
    state: &AppState,
    csr: &str,
    device: &DeviceId,
) -> Result<IssuedCertificate, String> {
    state
        .ca
        .sign_device_csr_valid_for(csr, device.as_str(), state.config.device_cert_validity())
        .map_err(|e| e.to_string())
}

/// What a device that was issued a certificate is answered (seed 004's shape).
pub(super) fn certificate_answer(state: &AppState, issued: &IssuedCertificate) -> Value {
    json!({
        "certificate": { "content": issued.certificate_pem },
        "ca_certificate": { "content": state.ca.certificate_pem() },
    })
}

/// After a change to a device's certificates committed: the gate re-reads the device. The
/// answer goes out whatever happens here; a failure is logged (replicas refresh it anyway).
pub(super) async fn refresh_gate(state: &AppState, device: &DeviceId) {
    if let Err(e) = state.gate.refresh(&state.store, device).await {
        tracing::warn!(device_id = %device, error = %e, "updating the gate failed");
    }
}

/// The audit detail and the answer for a token that cannot be redeemed; `None` if it can.
fn refusal(claim: TokenClaim) -> Option<(&'static str, ApiError)> {
    match claim {
        TokenClaim::Claimed { .. } => None,
        TokenClaim::Invalid => Some(("token unknown, used or expired", ApiError::Unauthorized)),
        TokenClaim::WrongDevice => Some((
            "token bound to another device",
            ApiError::Forbidden("token is bound to another device id"),
        )),
        TokenClaim::DeviceTaken => Some((
            "device id owned by another account",
            ApiError::Conflict("device id is registered to another account".into()),
        )),
    }
}
