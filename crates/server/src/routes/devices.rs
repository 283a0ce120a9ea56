use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flotilla_proto::{DeviceId, LedState};
use serde::Deserialize;
use serde_json::{Value, json};

use super::visible_device;
use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, JsonBody};
use flotilla_store::{AuditRecord, DeviceRow, TelemetryRow};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/device/register", post(register))
        .route("/api/device", get(list))
        .route("/api/device/{device_id}", get(show))
        .route("/api/device/{device_id}/telemetry", get(telemetry))
        .route("/api/device/{device_id}/led", post(led))
        .route("/api/device/{device_id}/tags", put(set_tags))
        .route("/api/dashboard", get(dashboard))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterDevice {
    device_id: String,
    name: String,
}

async fn register(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<RegisterDevice>,
) -> ApiResult<(StatusCode, Json<DeviceRow>)> {
    user.require_operator()?;
    let id =
        DeviceId::parse(&body.device_id).map_err(|e| ApiError::bad(format!("deviceId: {e}")))?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::bad("name must be 1 to 100 characters"));
    }
    let actor = user.actor();
    let ok = state.store.register_device(&id, name, user.id).await?;
    let result = if ok { "success" } else { "failure" };
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action: "device.register",
            target: Some(id.as_str()),
            result,
            detail: None,
        })
        .await;
    if !ok {
        return Err(ApiError::Conflict(
            "device id is registered to another account".into(),
        ));
    }
    let device = state
        .store
        .device(&id)
        .await?
        .ok_or(ApiError::NotFound("no such device"))?;
    Ok((StatusCode::CREATED, Json(device)))
}

async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Vec<DeviceRow>>> {
    Ok(Json(state.store.devices_of(Some(user.id)).await?))
}

async fn show(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<DeviceRow>> {
    Ok(Json(visible_device(&state, &user, &device_id).await?))
}

/// `?limit=`, for the listings that take one.
#[derive(Deserialize)]
pub(super) struct Limit {
    pub(super) limit: Option<i64>,
}

async fn telemetry(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Vec<TelemetryRow>>> {
    let device = visible_device(&state, &user, &device_id).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(Json(state.store.telemetry(&device.device_id, limit).await?))
}

#[derive(Deserialize)]
struct Led {
    state: String,
}

/// Seed 003's LED endpoint: a `led` command under the hood, so it waits for an offline
/// device and its outcome is readable like any other command.
async fn led(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<Led>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let led: LedState = serde_json::from_value(json!(body.state))
        .map_err(|_| ApiError::bad("state must be \"ON\" or \"OFF\""))?;
    let command = super::commands::create(
        &state,
        &user,
        &device_id,
        "led",
        json!({ "state": led.as_str() }),
        None,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "commandId": command.id, "state": command.state, "led": led.as_str() })),
    ))
}

async fn dashboard(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Value>> {
    let devices = state.store.devices_of(user.owner_filter()).await?;
    let online = devices.iter().filter(|d| d.online).count();
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for d in &devices {
        *versions
            .entry(
                d.firmware_version
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
            )
            .or_default() += 1;
    }
    Ok(Json(json!({
        "total": devices.len(),
        "online": online,
        "offline": devices.len() - online,
        "firmwareVersions": versions,
        "devices": devices,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tags {
    tags: Vec<String>,
}

/// Replaces a device's tags (labels that rollouts can target).
async fn set_tags(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<Tags>,
) -> ApiResult<Json<DeviceRow>> {
    user.require_operator()?;
    let device = visible_device(&state, &user, &device_id).await?;
    if body.tags.len() > 32
        || body.tags.iter().any(|t| {
            t.is_empty()
                || t.len() > 64
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:=".contains(&b))
        })
    {
        return Err(ApiError::bad(
            "tags: at most 32, each 1-64 characters of letters, digits and - _ . : =",
        ));
    }
    let mut tags = body.tags;
    tags.sort();
    tags.dedup();
    state
        .store
        .set_device_tags(&device.device_id, &tags)
        .await?;
    super::audit(
        &state,
        &user,
        "device.tags",
        device.device_id.as_str(),
        "success",
        Some(tags.join(",")),
    )
    .await;
    Ok(Json(visible_device(&state, &user, &device_id).await?))
}
