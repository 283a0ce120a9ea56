//! The audit log (admins): the newest records, and the chain for `flotilla audit verify` and
//! `flotilla audit export` — records in seq order with their hashes, the signed checkpoints,
//! and the export mark below which retention may remove records.

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiResult, JsonBody};
use flotilla_audit::{ChainedRecord, Checkpoint};
use flotilla_store::{AuditEntry, AuditRecord};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/audit", get(newest))
        .route("/api/admin/audit/chain", get(chain))
        .route("/api/admin/audit/checkpoints", get(checkpoints))
        .route("/api/admin/audit/exported", post(exported))
}

#[derive(Deserialize)]
struct NewestQuery {
    limit: Option<i64>,
    action: Option<String>,
}

async fn newest(
    State(state): State<AppState>,
    user: AuthUser,
    Query(q): Query<NewestQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    user.require_admin()?;
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    Ok(Json(
        state
            .store
            .audit_entries(limit, q.action.as_deref())
            .await?,
    ))
}

#[derive(Deserialize)]
struct ChainQuery {
    after: Option<u64>,
    limit: Option<i64>,
}

/// Up to `limit` (default 1,000, at most 10,000) records after seq `after`, oldest first.
async fn chain(
    State(state): State<AppState>,
    user: AuthUser,
    Query(q): Query<ChainQuery>,
) -> ApiResult<Json<Vec<ChainedRecord>>> {
    user.require_admin()?;
    let limit = q.limit.unwrap_or(1_000).clamp(1, 10_000);
    Ok(Json(
        state.store.audit_chain(q.after.unwrap_or(0), limit).await?,
    ))
}

async fn checkpoints(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<Json<Vec<Checkpoint>>> {
    user.require_admin()?;
    Ok(Json(state.store.audit_checkpoints().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Exported {
    /// The seq the copy starts after: past the current mark is a gap, refused (409).
    after: u64,
    through: u64,
}

/// An operator says they hold a copy of the log from after seq `after` through seq
/// `through`; retention may then remove those records once they are old enough. Audited.
async fn exported(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<Exported>,
) -> ApiResult<Json<Value>> {
    user.require_admin()?;
    let mark = state
        .store
        .mark_audit_exported(body.after, body.through)
        .await?;
    let actor = user.actor();
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action: "audit.export",
            target: None,
            result: "success",
            detail: Some(format!("through seq {mark}")),
        })
        .await;
    Ok(Json(json!({ "exportedThrough": mark })))
}
