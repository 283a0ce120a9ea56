use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router, extract::State};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult, JsonBody};
use crate::passwords::dummy_hash;
use crate::routes::ClientAddr;
use crate::shared_limits::{Anonymous, and_shared};
use flotilla_store::{AuditRecord, Role};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/auth/register", post(register))
        .route("/api/auth/login", post(login))
}

#[derive(Deserialize)]
struct Register {
    username: String,
    email: String,
    password: String,
}

#[derive(Deserialize)]
struct Login {
    email: String,
    password: String,
}

pub(crate) fn validate_credentials(
    username: &str,
    email: &str,
    password: &str,
) -> Result<(), ApiError> {
    if username.trim().is_empty() || username.len() > 64 {
        return Err(ApiError::bad("username must be 1 to 64 characters"));
    }
    let at = email.find('@');
    if email.len() > 254
        || at.is_none_or(|i| i == 0 || i == email.len() - 1)
        || email.chars().any(char::is_whitespace)
    {
        return Err(ApiError::bad("email must look like name@example.com"));
    }
    if password.len() < 6 || password.len() > 128 {
        return Err(ApiError::bad("password must be 6 to 128 characters"));
    }
    Ok(())
}

async fn register(
    State(state): State<AppState>,
    ClientAddr(from): ClientAddr,
    JsonBody(body): JsonBody<Register>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let email = body.email.trim().to_lowercase();
    validate_credentials(&body.username, &email, &body.password)?;
    // Every registration costs a password hash: a few per address and window, so one host
    // cannot keep the hashing slots busy for everyone else's logins.
    let shared = state
        .shared_limits
        .as_ref()
        .map(|s| s.begin_anonymous(Anonymous::Registration, from));
    let local = state.registrations.begin(from, std::time::Instant::now());
    if let Err(refused) = and_shared(local, shared).await {
        if refused.first {
            let from = from.map_or_else(|| "unknown".into(), |a| a.to_string());
            state
                .store
                .audit(AuditRecord {
                    actor: &format!("address:{from}"),
                    action: "user.register",
                    target: None,
                    result: "failure",
                    detail: Some("too many registrations from this address".into()),
                })
                .await;
        }
        return Err(ApiError::TooManyRequests);
    }
    let hash = state
        .passwords
        .hash(&body.password)
        .await
        .map_err(|_| ApiError::TooManyRequests)?;
    let id = match state
        .store
        .create_user(body.username.trim(), &email, &hash, Role::Operator)
        .await
    {
        Ok(id) => id,
        Err(e) => {
            let e = ApiError::from(e);
            return Err(if matches!(e, ApiError::Conflict(_)) {
                ApiError::Conflict("email is already registered".into())
            } else {
                e
            });
        }
    };
    let actor = format!("user:{email}");
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action: "user.register",
            target: Some(&actor),
            result: "success",
            detail: None,
        })
        .await;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": id, "username": body.username.trim(), "email": email, "role": "operator" }),
        ),
    ))
}

async fn login(
    State(state): State<AppState>,
    ClientAddr(from): ClientAddr,
    JsonBody(body): JsonBody<Login>,
) -> ApiResult<Json<Value>> {
    let email = body.email.trim().to_lowercase();
    if email.len() > 254 {
        return Err(ApiError::bad("email must be at most 254 characters"));
    }
    let actor = format!("user:{email}");
    let from_label = from.map_or_else(|| "unknown".to_string(), |a| a.to_string());
    let fail = |detail: &str| AuditRecord {
        actor: &actor,
        action: "auth.login",
        target: None,
        result: "failure",
        detail: Some(format!("{detail} (from {from_label})")),
    };
    let now = std::time::Instant::now();
    let shared = state.shared_limits.as_ref().map(|s| s.begin(&email, from));
    if let Err(refused) = and_shared(state.limiter.begin(&email, from, now), shared).await {
        // One audit row per flood and window, not one per refused request.
        if refused.first {
            state.store.audit(fail(refused.why.reason())).await;
        }
        return Err(ApiError::TooManyRequests);
    }
    let user = state.store.user_by_email(&email).await?;
    let hash = user
        .as_ref()
        .map_or(dummy_hash(), |u| u.password_hash.as_str());
    let ok = state
        .passwords
        .verify(&body.password, hash)
        .await
        .map_err(|_| ApiError::TooManyRequests)?;
    let Some(user) = user.filter(|_| ok) else {
        state.store.audit(fail("bad credentials")).await;
        return Err(ApiError::Unauthorized);
    };
    if user.blocked {
        state.store.audit(fail("account blocked")).await;
        return Err(ApiError::Forbidden("account is blocked"));
    }
    state.limiter.succeeded(&email, from);
    if let Some(shared) = &state.shared_limits {
        shared.succeeded(&email, from).await;
    }
    let token = state.jwt.issue(user.id, user.role)?;
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action: "auth.login",
            target: None,
            result: "success",
            detail: None,
        })
        .await;
    Ok(Json(json!({ "token": token })))
}
