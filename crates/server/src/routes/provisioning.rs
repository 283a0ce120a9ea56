use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use flotilla_proto::DeviceId;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult};
use flotilla_store::{AuditRecord, now_ms};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/provisioning/tokens", post(create))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NewToken {
    device_id: Option<String>,
    ttl_seconds: Option<u64>,
}

/// SHA-256 of a token, the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_operator()?;
    // The body is optional: no body means an unbound token with the default lifetime.
    let body: NewToken = if body.iter().all(u8::is_ascii_whitespace) {
        NewToken::default()
    } else {
        crate::error::parse_json_body(&body)?
    };
    let max = state.config.provisioning_ttl_secs.max(1);
    let ttl = body.ttl_seconds.unwrap_or(max);
    if ttl == 0 || ttl > max {
        return Err(ApiError::bad(format!("ttlSeconds must be 1 to {max}")));
    }
    let device = match body.device_id.as_deref() {
        Some(d) => {
            let id = DeviceId::parse(d).map_err(|e| ApiError::bad(format!("deviceId: {e}")))?;
            // A token may only name a device the caller owns or one nobody has claimed yet.
            if let Some(existing) = state.store.device(&id).await?
                && existing.owner_id != user.id
            {
                return Err(ApiError::Conflict(
                    "device id is registered to another account".into(),
                ));
            }
            Some(id)
        }
        None => None,
    };
    let token = format!("fpt_{}", hex::encode(rand::random::<[u8; 24]>()));
    let expires_at = now_ms() + ttl as i64 * 1000;
    state
        .store
        .create_token(&token_hash(&token), user.id, device.as_ref(), expires_at)
        .await?;
    let actor = user.actor();
    let target = device.as_ref().map(|d| d.as_str());
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action: "provisioning.token.create",
            target,
            result: "success",
            detail: Some(format!("ttl {ttl}s")),
        })
        .await;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": token, "expiresAt": expires_at })),
    ))
}
