//! The SoftAP provisioning server of seed 004: `GET /scan`, `GET /local-wifi`,
//! `POST /provision`, `GET /status`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_device_core::ProvisionRequest;
use serde_json::{Value, json};

use crate::runner::{DeviceHandle, Network, ProvisionRefusal};

#[derive(Clone)]
struct ApState {
    device: DeviceHandle,
    networks: Vec<Network>,
}

pub fn router(device: DeviceHandle, networks: Vec<Network>) -> Router {
    Router::new()
        .route("/scan", get(scan))
        .route("/local-wifi", get(scan))
        .route("/provision", post(provision))
        .route("/status", get(status))
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .with_state(ApState { device, networks })
}

async fn scan(State(s): State<ApState>) -> Json<Value> {
    Json(json!({ "networks": s.networks, "count": s.networks.len() }))
}

async fn provision(
    State(s): State<ApState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let fail = |code: StatusCode, message: String| {
        (code, Json(json!({ "status": "error", "message": message })))
    };
    let request: ProvisionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
    };
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    match s.device.provision(request, bearer).await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "message": "Credentials saved" })),
        ),
        Err(ProvisionRefusal::Invalid(why)) => fail(StatusCode::BAD_REQUEST, why),
        Err(ProvisionRefusal::AlreadyProvisioned) => {
            fail(StatusCode::CONFLICT, "device is already provisioned".into())
        }
        Err(ProvisionRefusal::DeviceGone) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "device is restarting".into(),
        ),
    }
}

async fn status(State(s): State<ApState>) -> (StatusCode, Json<Value>) {
    match s.device.status().await {
        Some(snapshot) => (StatusCode::OK, Json(json!(snapshot))),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "disconnected" })),
        ),
    }
}
