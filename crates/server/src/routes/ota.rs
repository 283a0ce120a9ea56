//! Seed 003's per-device OTA endpoints, plus history and the fleet's version distribution.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_proto::FirmwareVersion;
use serde::Deserialize;
use serde_json::{Value, json};

use super::releases::find;
use super::visible_device;
use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use flotilla_store::{ReleaseRow, UpdateRow};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/ota/{device_id}/check", get(check))
        .route("/api/ota/{device_id}/start", post(start))
        .route("/api/ota/{device_id}/cancel", post(cancel))
        .route("/api/ota/{device_id}/history", get(history))
        .route("/api/firmware/distribution", get(distribution))
}

fn newer(release: &ReleaseRow, running: Option<&str>) -> bool {
    let offered = release.version.parse::<FirmwareVersion>().ok();
    let running = running.and_then(|v| v.parse::<FirmwareVersion>().ok());
    match (offered, running) {
        (Some(o), Some(r)) => o > r,
        (Some(_), None) => true,
        _ => false,
    }
}

/// `{"updateAvailable": bool, "latestVersion": ...}` as in the seed, plus what runs now.
async fn check(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = visible_device(&state, &user, &device_id).await?;
    let latest = state
        .store
        .latest_release(device.hardware.as_deref())
        .await?;
    let available = latest
        .as_ref()
        .is_some_and(|r| newer(r, device.firmware_version.as_deref()));
    Ok(Json(json!({
        "updateAvailable": available,
        "latestVersion": latest.map(|r| r.version),
        "currentVersion": device.firmware_version,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    /// Defaults to the latest release for the device's hardware.
    version: Option<String>,
    /// Allows an older version (the device still refuses a lower security counter), and
    /// replaces an update the device has started instead of refusing with 409 (the device is
    /// told to stop it, as by `POST /api/ota/{id}/cancel`).
    #[serde(default)]
    force: bool,
}

/// Offers a release to one device (seed 001's send_ota_update). 202: the device reports the
/// rest on `ota/status`, visible in the history.
async fn start(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<UpdateRow>)> {
    user.require_operator()?;
    // The seed's start takes no body; ours may name a version and force.
    let body: StartRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StartRequest::default()
    } else {
        crate::error::parse_json_body(&body)?
    };
    let device = visible_device(&state, &user, &device_id).await?;
    let release = match body.version.as_deref() {
        Some(v) => find(&state, v).await?,
        None => state
            .store
            .latest_release(device.hardware.as_deref())
            .await?
            .ok_or(ApiError::NotFound("no release available for this device"))?,
    };
    if device.blocked {
        return Err(ApiError::Conflict("device is blocked".into()));
    }
    if !release.ready {
        return Err(ApiError::Conflict(
            "the release's image is not uploaded yet".into(),
        ));
    }
    if release.blocked {
        return Err(ApiError::Conflict(format!(
            "release {} is blocked",
            release.version
        )));
    }
    if device
        .hardware
        .as_deref()
        .is_some_and(|h| h != release.hardware)
    {
        return Err(ApiError::Conflict(format!(
            "release {} is built for {}, the device is {}",
            release.version,
            release.hardware,
            device.hardware.as_deref().unwrap_or("?")
        )));
    }
    if !body.force && !newer(&release, device.firmware_version.as_deref()) {
        return Err(ApiError::Conflict(format!(
            "device already runs {}; use force to install {}",
            device.firmware_version.as_deref().unwrap_or("?"),
            release.version
        )));
    }
    let update = state
        .ota
        .offer(&device.device_id, &release, body.force, None, Some(user.id))
        .await
        .map_err(|e| match e {
            // Working on another update: it finishes (or fails) before a new one is offered.
            flotilla_store::StoreError::Conflict(why) => ApiError::Conflict(why.to_string()),
            e => e.into(),
        })?;
    super::audit(
        &state,
        &user,
        "ota.start",
        device.device_id.as_str(),
        "success",
        Some(format!(
            "{} {}{}",
            update.id,
            release.version,
            if body.force { " (forced)" } else { "" }
        )),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(update)))
}

/// Cancels the device's open update (offered, started or downloading) and tells the device,
/// which stops downloading and reports FAILED; an image all downloaded is past recall (409).
/// A rollout's target waits again (not a failure). 404 when there is none. Audited.
async fn cancel(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<UpdateRow>> {
    user.require_operator()?;
    let device = visible_device(&state, &user, &device_id).await?;
    let why = format!("cancelled by {}", user.actor());
    let cancelled = state
        .ota
        .cancel(&device.device_id, &why)
        .await
        .map_err(|e| match e {
            flotilla_store::StoreError::Conflict(why) => ApiError::Conflict(why.to_string()),
            e => e.into(),
        })?
        .ok_or(ApiError::NotFound("the device has no open update"))?;
    super::audit(
        &state,
        &user,
        "ota.cancel",
        device.device_id.as_str(),
        "success",
        Some(format!("{} {}", cancelled.id, cancelled.version)),
    )
    .await;
    Ok(Json(cancelled))
}

async fn history(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = visible_device(&state, &user, &device_id).await?;
    let history = state.store.update_history(&device.device_id, 50).await?;
    let updates: Vec<Value> = history
        .into_iter()
        .map(|(u, events)| {
            let mut v = serde_json::to_value(u).unwrap_or(Value::Null);
            v["events"] = serde_json::to_value(events).unwrap_or(Value::Null);
            v
        })
        .collect();
    Ok(Json(
        json!({ "deviceId": device.device_id, "updates": updates }),
    ))
}

async fn distribution(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Value>> {
    let rows = state
        .store
        .version_distribution(user.owner_filter())
        .await?;
    let versions: Vec<Value> = rows
        .into_iter()
        .map(|(v, n)| json!({ "version": v, "devices": n }))
        .collect();
    Ok(Json(json!({ "versions": versions })))
}
