use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use super::visible_device;
use crate::app::AppState;
use crate::auth::AuthUser;
use crate::command_waits::MAX_WAIT_SECS;
use crate::commands::{DEFAULT_TTL_SECS, MAX_TTL_SECS, validate};
use crate::error::{ApiError, ApiResult, JsonBody};
use flotilla_store::{CommandRow, now_ms};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/device/{device_id}/commands", get(list).post(send))
        .route("/api/device/{device_id}/commands/{command_id}", get(show))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewCommand {
    name: String,
    #[serde(default)]
    args: Value,
    ttl_seconds: Option<u64>,
}

/// Validates, stores, audits and sends a command. Shared with the LED endpoint.
pub(crate) async fn create(
    state: &AppState,
    user: &AuthUser,
    device_id: &str,
    name: &str,
    args: Value,
    ttl: Option<u64>,
) -> ApiResult<CommandRow> {
    user.require_operator()?;
    let device = visible_device(state, user, device_id).await?;
    validate(name, &args).map_err(ApiError::BadRequest)?;
    let ttl = ttl.unwrap_or(DEFAULT_TTL_SECS);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(ApiError::bad(format!(
            "ttlSeconds must be 1 to {MAX_TTL_SECS}"
        )));
    }
    if device.blocked {
        return Err(ApiError::Conflict("device is blocked".into()));
    }
    let id = format!("cmd-{}", hex::encode(rand::random::<[u8; 12]>()));
    let expires_at = now_ms() + ttl as i64 * 1000;
    let command = state
        .store
        .create_command(&id, &device.device_id, name, &args, user.id, expires_at)
        .await?;
    super::audit(
        state,
        user,
        "command.create",
        device.device_id.as_str(),
        "success",
        Some(format!("{id} {name}")),
    )
    .await;
    state.dispatcher.send(&command).await;
    Ok(command)
}

async fn send(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<NewCommand>,
) -> ApiResult<(StatusCode, Json<CommandRow>)> {
    let command = create(
        &state,
        &user,
        &device_id,
        &body.name,
        body.args,
        body.ttl_seconds,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(command)))
}

async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Vec<CommandRow>>> {
    let device = visible_device(&state, &user, &device_id).await?;
    Ok(Json(state.store.commands_of(&device.device_id, 200).await?))
}

#[derive(Deserialize)]
struct ShowQuery {
    /// Seconds to wait for the command to finish (answered or expired) before answering.
    wait: Option<u64>,
}

/// A command; with `?wait=SECS` (at most 30) once it has finished, or as it stands when the
/// wait ends.
async fn show(
    State(state): State<AppState>,
    user: AuthUser,
    Path((device_id, command_id)): Path<(String, String)>,
    Query(query): Query<ShowQuery>,
) -> ApiResult<Json<CommandRow>> {
    let device = visible_device(&state, &user, &device_id).await?;
    let wait = match query.wait {
        Some(secs) if secs > MAX_WAIT_SECS => {
            return Err(ApiError::BadRequest(format!(
                "wait is at most {MAX_WAIT_SECS} seconds"
            )));
        }
        secs => Duration::from_secs(secs.unwrap_or(0)),
    };
    let command = state
        .command_waits
        .finished(&state.store, &command_id, wait, |c| {
            c.device_id == device.device_id
        })
        .await?;
    Ok(Json(command.ok_or(ApiError::NotFound("no such command"))?))
}
