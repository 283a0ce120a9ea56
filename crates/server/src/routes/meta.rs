use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use crate::app::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/ca.pem", get(ca_pem))
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
}

/// Prometheus text format; an admin's JWT or the scrape token opens it.
async fn metrics(
    State(state): State<AppState>,
    mut parts: axum::http::request::Parts,
) -> crate::error::ApiResult<impl IntoResponse> {
    let bearer = crate::auth::bearer(&parts.headers);
    let by_token = bearer.is_some_and(|t| {
        crate::metrics::token_matches(state.config.metrics_token.as_ref().map(|s| s.expose()), t)
    });
    if !by_token {
        use axum::extract::FromRequestParts;
        crate::auth::AuthUser::from_request_parts(&mut parts, &state)
            .await?
            .require_admin()?;
    }
    let fleet = state.metrics.fleet(&state.store).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(
            &fleet,
            state.writer.queued_bytes(),
            state.leadership.is_leader(),
        ),
    ))
}

pub(crate) async fn ca_pem(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.certificate_pem().to_string(),
    )
}

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}
