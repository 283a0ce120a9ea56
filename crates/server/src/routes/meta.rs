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
