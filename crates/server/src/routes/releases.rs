//! Releases: publish a signed manifest (checked against the trusted release keys), upload its
//! image (checked against the manifest), list, block.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use flotilla_proto::{FirmwareVersion, SignedManifest};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::{ApiError, ApiResult, JsonBody};
use crate::ota::artifacts::UploadError;
use crate::rollouts;
use flotilla_store::{NewRelease, ReleaseRow};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/releases", get(list).post(publish))
        .route("/api/releases/blocked", get(blocked))
        .route("/api/releases/{version}", get(show))
        .route("/api/releases/{version}/image", put(upload))
        .route("/api/releases/{version}/block", post(block))
        .route("/api/releases/{version}/download", get(download_url))
}

async fn publish(
    State(state): State<AppState>,
    user: AuthUser,
    JsonBody(body): JsonBody<SignedManifest>,
) -> ApiResult<(StatusCode, Json<ReleaseRow>)> {
    user.require_admin()?;
    if state.ota.keys.is_empty() {
        return Err(ApiError::Conflict(
            "no release keys are configured on the server (--release-key)".into(),
        ));
    }
    let manifest = match state.ota.keys.verify(&body) {
        Ok(m) => m,
        Err(why) => {
            super::audit(
                &state,
                &user,
                "release.publish",
                "-",
                "refused",
                Some(why.clone()),
            )
            .await;
            return Err(ApiError::bad(format!("release refused: {why}")));
        }
    };
    let release = state
        .store
        .create_release(NewRelease {
            version: &manifest.version,
            hardware: &manifest.hardware,
            size: manifest.size,
            sha256: &manifest.sha256.to_ascii_lowercase(),
            security_counter: manifest.security_counter,
            manifest: &body.manifest,
            signature: &body.signature,
            created_by: user.id,
        })
        .await
        .map_err(|e| match ApiError::from(e) {
            ApiError::Conflict(_) => {
                ApiError::Conflict(format!("release {} already exists", manifest.version))
            }
            other => other,
        })?;
    super::audit(
        &state,
        &user,
        "release.publish",
        &release.version,
        "success",
        Some(format!("{} {} bytes", release.hardware, release.size)),
    )
    .await;
    Ok((StatusCode::CREATED, Json(release)))
}

async fn upload(
    State(state): State<AppState>,
    user: AuthUser,
    Path(version): Path<String>,
    body: Body,
) -> ApiResult<Json<ReleaseRow>> {
    user.require_admin()?;
    let release = find(&state, &version).await?;
    if release.ready {
        return Err(ApiError::Conflict(
            "the image of this release is already stored".into(),
        ));
    }
    let signed = SignedManifest {
        manifest: release.manifest.clone(),
        signature: release.signature.clone(),
    };
    let manifest =
        state.ota.keys.verify(&signed).map_err(|why| {
            ApiError::Conflict(format!("stored manifest no longer verifies: {why}"))
        })?;
    match state
        .ota
        .artifacts
        .store(&manifest, body.into_data_stream())
        .await
    {
        Ok(()) => {}
        Err(UploadError::Mismatch(why)) => {
            super::audit(
                &state,
                &user,
                "release.upload",
                &release.version,
                "refused",
                Some(why.clone()),
            )
            .await;
            return Err(ApiError::bad(why));
        }
        Err(UploadError::Io(e)) => return Err(ApiError::Internal(e)),
    }
    state.store.mark_release_ready(&release.version).await?;
    super::audit(
        &state,
        &user,
        "release.upload",
        &release.version,
        "success",
        None,
    )
    .await;
    Ok(Json(find(&state, &version).await?))
}

async fn list(State(state): State<AppState>, _user: AuthUser) -> ApiResult<Json<Vec<ReleaseRow>>> {
    Ok(Json(state.store.releases().await?))
}

async fn show(
    State(state): State<AppState>,
    _user: AuthUser,
    Path(version): Path<String>,
) -> ApiResult<Json<ReleaseRow>> {
    Ok(Json(find(&state, &version).await?))
}

/// How long a presigned download URL stays valid.
const PRESIGNED_VALIDITY: std::time::Duration = std::time::Duration::from_secs(900);

/// A presigned URL of the image in the S3 store (seed 003's signed URLs), for operators and
/// tools; devices download through the device listener with their certificate instead.
async fn download_url(
    State(state): State<AppState>,
    user: AuthUser,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_operator()?;
    let release = find(&state, &version).await?;
    if !release.ready {
        return Err(ApiError::Conflict(
            "the release's image is not uploaded yet".into(),
        ));
    }
    let url = state
        .ota
        .artifacts
        .presigned_url(&release.hardware, &release.version, PRESIGNED_VALIDITY)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict("presigned URLs need the S3 artifact store (--s3-bucket)".into())
        })?;
    Ok(Json(
        json!({ "url": url, "expiresInSecs": PRESIGNED_VALIDITY.as_secs(), "sha256": release.sha256 }),
    ))
}

/// Seed 003's `rollback/blocked_versions.json`.
async fn blocked(State(state): State<AppState>, _user: AuthUser) -> ApiResult<Json<Value>> {
    let blocked: Vec<Value> = state
        .store
        .releases()
        .await?
        .into_iter()
        .filter(|r| r.blocked)
        .map(|r| json!({ "version": r.version, "reason": r.blocked_reason }))
        .collect();
    let versions: Vec<&Value> = blocked.iter().map(|b| &b["version"]).collect();
    Ok(Json(
        json!({ "blockedVersions": versions, "releases": blocked }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRequest {
    blocked: bool,
    #[serde(default)]
    reason: Option<String>,
}

async fn block(
    State(state): State<AppState>,
    user: AuthUser,
    Path(version): Path<String>,
    JsonBody(body): JsonBody<BlockRequest>,
) -> ApiResult<Json<ReleaseRow>> {
    user.require_admin()?;
    let release = find(&state, &version).await?;
    let reason = body
        .reason
        .as_deref()
        .map(|r| flotilla_proto::truncate_chars(r.trim(), 200));
    state
        .store
        .set_release_blocked(&release.version, body.blocked, reason)
        .await?;
    let action = if body.blocked {
        "release.block"
    } else {
        "release.unblock"
    };
    super::audit(
        &state,
        &user,
        action,
        &release.version,
        "success",
        reason.map(str::to_string),
    )
    .await;
    if body.blocked {
        state
            .ota
            .notify(rollouts::Event::ReleaseBlocked(release.version.clone()))
            .await;
    }
    Ok(Json(find(&state, &version).await?))
}

/// A release by version; 404 for anything else, including strings that are not versions.
pub(crate) async fn find(state: &AppState, version: &str) -> ApiResult<ReleaseRow> {
    if version.parse::<FirmwareVersion>().is_err() {
        return Err(ApiError::NotFound("no such release"));
    }
    state
        .store
        .release(version)
        .await?
        .ok_or(ApiError::NotFound("no such release"))
}
