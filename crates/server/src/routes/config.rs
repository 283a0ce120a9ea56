//! `GET` and `PUT /api/device/{id}/config`: the device twin. `PUT` replaces the desired
//! configuration (the protocol's `DesiredConfig` fields) and publishes it retained; `GET`
//! shows desired, reported, and which fields differ.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use flotilla_proto::{DesiredConfig, MAX_INTERVAL_S};
use serde::Deserialize;
use serde_json::{Value, json};

use super::visible_device;
use crate::app::AppState;
use crate::auth::AuthUser;
use crate::device_config::{differences, publish};
use crate::error::{ApiError, ApiResult, JsonBody};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/device/{device_id}/config", get(show).put(replace))
}

/// The body: the protocol's fields, nothing else (a misspelt field is an error, not ignored).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Desired {
    telemetry_interval_s: Option<u32>,
    heartbeat_interval_s: Option<u32>,
    pot: Option<bool>,
    switch: Option<bool>,
    temp: Option<bool>,
}

impl Desired {
    fn validated(self) -> Result<DesiredConfig, ApiError> {
        for (name, v) in [
            ("telemetry_interval_s", self.telemetry_interval_s),
            ("heartbeat_interval_s", self.heartbeat_interval_s),
        ] {
            if v.is_some_and(|s| !(1..=MAX_INTERVAL_S).contains(&s)) {
                return Err(ApiError::bad(format!(
                    "{name} must be 1 to {MAX_INTERVAL_S} seconds"
                )));
            }
        }
        let config = DesiredConfig {
            telemetry_interval_s: self.telemetry_interval_s,
            heartbeat_interval_s: self.heartbeat_interval_s,
            pot: self.pot,
            switch: self.switch,
            temp: self.temp,
        };
        if config == DesiredConfig::default() {
            return Err(ApiError::bad("set at least one field"));
        }
        Ok(config)
    }
}

async fn view(state: &AppState, device: &flotilla_proto::DeviceId) -> ApiResult<Value> {
    let row = state
        .store
        .device_config(device)
        .await?
        .ok_or(ApiError::NotFound("no such device"))?;
    let differ = row
        .desired
        .as_ref()
        .map(|d| differences(d, row.reported.as_ref()))
        .unwrap_or_default();
    Ok(json!({
        "deviceId": device,
        "desired": row.desired,
        "desiredAt": row.desired_at,
        "reported": row.reported,
        "reportedAt": row.reported_at,
        "inSync": differ.is_empty(),
        "differences": differ,
    }))
}

async fn show(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = visible_device(&state, &user, &device_id).await?;
    Ok(Json(view(&state, &device.device_id).await?))
}

async fn replace(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<Desired>,
) -> ApiResult<Json<Value>> {
    user.require_operator()?;
    let device = visible_device(&state, &user, &device_id).await?;
    let config = body.validated()?;
    if !state
        .store
        .set_desired_config(&device.device_id, &config)
        .await?
    {
        return Err(ApiError::NotFound("no such device"));
    }
    // Kept in the database first: a publish that fails now is repeated at the next session.
    let published = publish(&state.dispatcher, &device.device_id, &config);
    super::audit(
        &state,
        &user,
        "device.config",
        device.device_id.as_str(),
        "success",
        Some(serde_json::to_string(&config).unwrap_or_default()),
    )
    .await;
    let mut view = view(&state, &device.device_id).await?;
    view["published"] = published.into();
    Ok(Json(view))
}
