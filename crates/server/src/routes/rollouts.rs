//! Staged rollouts: create one for a release and a target, watch its progress, pause, resume
//! or abort it. The planning itself is `crate::rollouts`.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use flotilla_proto::FirmwareVersion;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::releases::find;
use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, JsonBody};
use crate::rollouts::{Applied, Control, Event, Settings};
use flotilla_store::{RolloutRow, RolloutState, TargetSelector, TargetState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/rollouts", get(list).post(create))
        .route("/api/rollouts/{id}", get(show))
        .route("/api/rollouts/{id}/{action}", post(control))
}

/// Which devices a rollout is for. Exactly one of the fields.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Target {
    /// Every device of this hardware type.
    hardware: Option<String>,
    /// Every device carrying this tag.
    tag: Option<String>,
    /// These devices.
    devices: Option<Vec<String>>,
    /// Every visible device.
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewRollout {
    version: String,
    target: Target,
    #[serde(flatten)]
    settings: Value,
}

async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<NewRollout>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_operator()?;
    let mut settings: Settings = serde_json::from_value(body.settings)
        .map_err(|e| ApiError::bad(format!("rollout settings: {e}")))?;
    settings.validate().map_err(ApiError::BadRequest)?;
    let release = find(&state, &body.version).await?;
    if !release.ready || release.blocked {
        return Err(ApiError::Conflict(format!(
            "release {} is {}",
            release.version,
            if release.blocked {
                "blocked"
            } else {
                "not uploaded yet"
            }
        )));
    }
    let t = &body.target;
    let chosen = [
        t.hardware.is_some(),
        t.tag.is_some(),
        t.devices.is_some(),
        t.all,
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if chosen != 1 {
        return Err(ApiError::bad(
            "target must name exactly one of hardware, tag, devices or all",
        ));
    }
    if let Some(ids) = &t.devices
        && (ids.is_empty() || ids.len() > 100_000)
    {
        return Err(ApiError::bad(
            "target.devices must list 1 to 100000 devices",
        ));
    }
    let selector = match (&t.hardware, &t.tag, &t.devices) {
        (Some(h), _, _) => TargetSelector::Hardware(h),
        (_, Some(tag), _) => TargetSelector::Tag(tag),
        (_, _, Some(ids)) => TargetSelector::Devices(ids),
        _ => TargetSelector::All,
    };
    let selection = state
        .store
        .rollout_candidates(user.owner_filter(), selector, &release.hardware)
        .await?;
    if let Some(missing) = &selection.unknown {
        return Err(ApiError::bad(format!(
            "target.devices: no such device '{}'",
            flotilla_proto::truncate_chars(missing, 64)
        )));
    }
    let offered: FirmwareVersion = release
        .version
        .parse()
        .map_err(|_| ApiError::Conflict("release version unreadable".into()))?;
    // Devices that already run this version or newer are not targets.
    let targets: Vec<String> = selection
        .candidates
        .into_iter()
        .filter(|d| {
            d.firmware_version
                .as_deref()
                .and_then(|v| v.parse::<FirmwareVersion>().ok())
                .is_none_or(|running| running < offered)
        })
        .map(|d| d.device_id.to_string())
        .collect();
    if targets.is_empty() {
        return Err(ApiError::Conflict(
            "no target device needs this release".into(),
        ));
    }
    let id = format!("ro-{}", hex::encode(rand::random::<[u8; 8]>()));
    let config = serde_json::to_value(&settings).map_err(|e| ApiError::Internal(e.into()))?;
    let row = state
        .store
        .create_rollout(&id, &release.version, &config, &targets, user.id)
        .await?;
    super::audit(
        &state,
        &user,
        "rollout.create",
        &id,
        "success",
        Some(format!("{} to {} devices", release.version, targets.len())),
    )
    .await;
    state.ota.notify(Event::Start(id)).await;
    Ok((StatusCode::CREATED, Json(view(&state, row).await?)))
}

/// A rollout with its progress: its saved state, why it halted, and its targets counted by
/// state as the leader last saved them (the same on every replica).
async fn view(state: &AppState, row: RolloutRow) -> ApiResult<Value> {
    let counts: HashMap<TargetState, i64> = state
        .store
        .rollout_target_counts(&row.id)
        .await?
        .into_iter()
        .collect();
    let count = |s: TargetState| counts.get(&s).copied().unwrap_or(0);
    let mut per_state: HashMap<&'static str, usize> = HashMap::new();
    for (_, s) in state.store.rollout_outcomes(&row.id).await? {
        *per_state.entry(s.as_str()).or_default() += 1;
    }
    let mut v = serde_json::to_value(&row).map_err(|e| ApiError::Internal(e.into()))?;
    v["targetCount"] = json!(row.targets.len());
    v["updates"] = json!(per_state);
    v["progress"] = json!({
        "state": row.state,
        "phase": row.phase,
        "halt": row.halt,
        "reason": row.reason,
        "waiting": count(TargetState::Waiting),
        "inFlight": count(TargetState::InFlight),
        "succeeded": count(TargetState::Succeeded),
        "failed": count(TargetState::Failed),
        "timedOut": count(TargetState::TimedOut),
        "skipped": count(TargetState::Skipped),
    });
    if let Some(obj) = v.as_object_mut() {
        obj.remove("targets");
    }
    Ok(v)
}

async fn list(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Vec<Value>>> {
    let mut out = Vec::new();
    for row in state.store.rollouts().await? {
        if user.owner_filter().is_none() || row.created_by == Some(user.id) {
            out.push(view(&state, row).await?);
        }
    }
    Ok(Json(out))
}

async fn find_rollout(state: &AppState, user: &AuthUser, id: &str) -> ApiResult<RolloutRow> {
    state
        .store
        .rollout(id)
        .await?
        .filter(|r| user.owner_filter().is_none() || r.created_by == Some(user.id))
        .ok_or(ApiError::NotFound("no such rollout"))
}

async fn show(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = find_rollout(&state, &user, &id).await?;
    Ok(Json(view(&state, row).await?))
}

async fn control(
    State(state): State<AppState>,
    user: AuthUser,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_operator()?;
    let op: Control = serde_json::from_value(json!(action))
        .map_err(|_| ApiError::NotFound("no such rollout action (pause, resume, abort)"))?;
    let row = find_rollout(&state, &user, &id).await?;
    let (reply, rx) = oneshot::channel();
    state
        .ota
        .notify(Event::Control {
            id: row.id.clone(),
            op,
            actor: user.actor(),
            reply,
        })
        .await;
    match rx.await {
        Ok(Ok(Applied::Done(_))) => {}
        // Another replica leads: it takes the request from the rollout within a second or
        // two; answer with the state it reached, or as requested (202) if it has not yet.
        Ok(Ok(Applied::Requested)) => {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let row = find_rollout(&state, &user, &id).await?;
                if row.control.is_none() {
                    // Answered: carried out, or refused (the state is not what the op makes).
                    let reached = match op {
                        Control::Pause => row.state == RolloutState::Paused,
                        Control::Resume => {
                            matches!(row.state, RolloutState::Running | RolloutState::Completed)
                        }
                        Control::Abort => row.state == RolloutState::Aborted,
                    };
                    if !reached {
                        return Err(ApiError::Conflict(format!(
                            "the leader refused to {}: rollout is {}",
                            op.as_str(),
                            row.state.as_str()
                        )));
                    }
                    return Ok((StatusCode::OK, Json(view(&state, row).await?)));
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok((StatusCode::ACCEPTED, Json(view(&state, row).await?)));
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        Ok(Err(why)) => return Err(ApiError::Conflict(why)),
        Err(_) => return Err(ApiError::Internal(anyhow::anyhow!("rollout task gone"))),
    }
    let row = find_rollout(&state, &user, &id).await?;
    Ok((StatusCode::OK, Json(view(&state, row).await?)))
}
