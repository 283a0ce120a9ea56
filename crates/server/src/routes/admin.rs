use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, JsonBody};
use flotilla_store::{AuditRecord, DeviceRow, Role, UserChange, UserRow};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/users", get(users))
        .route("/api/admin/devices", get(devices))
        .route("/api/admin/user/{user_id}/block", post(block_user))
        .route("/api/admin/user/{user_id}/role", post(set_role))
        .route("/api/admin/device/{device_id}/block", post(block_device))
        .route(
            "/api/admin/device/{device_id}/revoke",
            post(revoke_device_certificate),
        )
        .route("/api/admin/stats", get(stats))
        .route("/api/admin/security", get(security_report))
        .route("/api/admin/dead-letters", get(dead_letters))
}

async fn users(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Vec<UserRow>>> {
    user.require_admin()?;
    Ok(Json(state.store.users().await?))
}

async fn devices(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Vec<DeviceRow>>> {
    user.require_admin()?;
    Ok(Json(state.store.devices_of(None).await?))
}

async fn block_user(
    State(state): State<AppState>,
    user: AuthUser,
    Path(user_id): Path<i64>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    if user_id == user.id {
        return Err(ApiError::bad("an admin cannot block their own account"));
    }
    let blocked = match state.store.toggle_user_block(user_id).await? {
        UserChange::Done(blocked) => blocked,
        UserChange::NotFound => return Err(ApiError::NotFound("no such user")),
        UserChange::LastAdmin => return Err(last_admin()),
    };
    let (actor, target) = (user.actor(), format!("user:{user_id}"));
    let action = if blocked {
        "admin.user.block"
    } else {
        "admin.user.unblock"
    };
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action,
            target: Some(&target),
            result: "success",
            detail: None,
        })
        .await;
    Ok(Json(json!({ "userId": user_id, "blocked": blocked })))
}

fn last_admin() -> ApiError {
    ApiError::Conflict(
        "the last active admin cannot be demoted or blocked; make another admin first".into(),
    )
}

#[derive(Deserialize)]
struct SetRole {
    role: Role,
}

async fn set_role(
    State(state): State<AppState>,
    user: AuthUser,
    Path(user_id): Path<i64>,
    JsonBody(body): JsonBody<SetRole>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    match state.store.set_user_role(user_id, body.role).await? {
        UserChange::Done(()) => {}
        UserChange::NotFound => return Err(ApiError::NotFound("no such user")),
        UserChange::LastAdmin => return Err(last_admin()),
    }
    let (actor, target) = (user.actor(), format!("user:{user_id}"));
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action: "admin.user.role",
            target: Some(&target),
            result: "success",
            detail: Some(body.role.as_str().into()),
        })
        .await;
    Ok(Json(json!({ "userId": user_id, "role": body.role })))
}

/// Toggles a device's block (seed 003). A blocked device is refused at connect and a
/// connected one is disconnected at once.
async fn block_device(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let id = super::device_in_path(&device_id)?;
    let blocked = state
        .store
        .toggle_device_block(&id)
        .await
        .map_err(no_such_device)?;
    state.gate.refresh(&state.store, &id).await?;
    if blocked {
        disconnect(&state, &id, "blocked").await;
    }
    let action = if blocked {
        "admin.device.block"
    } else {
        "admin.device.unblock"
    };
    audit_device(&state, &user, action, &id).await;
    Ok(Json(json!({ "deviceId": device_id, "blocked": blocked })))
}

fn no_such_device(e: flotilla_store::StoreError) -> ApiError {
    match e {
        flotilla_store::StoreError::NotFound => ApiError::NotFound("no such device"),
        e => e.into(),
    }
}

/// Closes the device's session at the broker and shows it offline with `reason`.
async fn disconnect(state: &AppState, id: &flotilla_proto::DeviceId, reason: &str) {
    state.broker.kick(id.as_str()).await;
    if let Err(e) = state.store.mark_offline(id, reason).await {
        tracing::warn!(device_id = %id, error = %e, "marking a device offline failed");
    }
}

async fn audit_device(
    state: &AppState,
    user: &AuthUser,
    action: &str,
    id: &flotilla_proto::DeviceId,
) {
    let actor = user.actor();
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action,
            target: Some(id.as_str()),
            result: "success",
            detail: None,
        })
        .await;
}

/// Revokes a device's certificate: the device is disconnected and refused until it is
/// provisioned again (a new token, a new certificate). With an external broker the revocation
/// reaches it through `flotilla-server broker-sync` (CRL and ACL).
async fn revoke_device_certificate(
    State(state): State<AppState>,
    user: AuthUser,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let id = super::device_in_path(&device_id)?;
    let revoked = state
        .store
        .revoke_device_certificate(&id)
        .await
        .map_err(no_such_device)?;
    if !revoked {
        return Err(ApiError::Conflict(
            "the device holds no certificate to revoke".into(),
        ));
    }
    state.gate.refresh(&state.store, &id).await?;
    disconnect(&state, &id, "certificate revoked").await;
    audit_device(&state, &user, "admin.device.revoke", &id).await;
    Ok(Json(json!({ "deviceId": id, "revoked": true })))
}

async fn stats(State(state): State<AppState>, user: AuthUser) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let mut stats = state.store.stats().await?;
    if let Some(fields) = stats.as_object_mut() {
        {
            use std::sync::atomic::Ordering::Relaxed;
            let waits = &state.command_waits;
            fields.insert(
                "commandWaits".into(),
                serde_json::json!({
                    "woken": waits.woken.load(Relaxed),
                    "reread": waits.reread.load(Relaxed),
                }),
            );
        }
        if let Some(link) = state.broker.link_stats() {
            fields.insert("ingestLink".into(), link);
        }
        fields.insert("leader".into(), state.leadership.is_leader().into());
        let storage = state.store.storage_figures().await?;
        fields.insert(
            "storage".into(),
            serde_json::to_value(storage).unwrap_or_default(),
        );
    }
    Ok(Json(stats))
}

#[derive(Deserialize)]
struct SecurityQuery {
    days: Option<i64>,
    crashes: Option<i64>,
    limit: Option<i64>,
}

/// The fleet security report: certificates expiring within `days` (default 30), blocked or
/// revoked devices still connected, devices reporting at least `crashes` (default 3) crashed
/// boots, and provisioned devices never seen; at most `limit` (default 500) of each.
async fn security_report(
    State(state): State<AppState>,
    user: AuthUser,
    Query(q): Query<SecurityQuery>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let days = q.days.unwrap_or(30);
    if !(0..=3650).contains(&days) {
        return Err(ApiError::bad("days must be between 0 and 3650"));
    }
    let crashes = q.crashes.unwrap_or(3).max(1);
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let horizon = flotilla_store::now_ms().saturating_add(days * 86_400_000);
    let report = state.store.security_report(horizon, crashes, limit).await?;
    Ok(Json(json!({
        "horizonDays": days,
        "expiringCertificates": report.expiring_certificates,
        "deniedButConnected": report.denied_but_connected,
        "crashLoops": report.crash_loops,
        "neverSeen": report.never_seen,
    })))
}

async fn dead_letters(
    State(state): State<AppState>,
    user: AuthUser,
    Query(q): Query<super::devices::Limit>,
) -> ApiResult<Json<Vec<Value>>> {
    user.require_admin()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let rows = state.store.dead_letters(limit).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(topic, reason)| json!({ "topic": topic, "reason": reason }))
            .collect(),
    ))
}
