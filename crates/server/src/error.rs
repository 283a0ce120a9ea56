//! One error type for every HTTP handler. 4xx bodies say what to fix; 5xx bodies are generic
//! and the detail goes to the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    Forbidden(&'static str),
    NotFound(&'static str),
    Gone(&'static str),
    Conflict(String),
    TooManyRequests,
    PayloadTooLarge,
    /// The database cannot be reached or is busy past its timeout.
    Unavailable,
    Internal(anyhow::Error),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing, invalid or expired credentials".into(),
            ),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m.into()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m.into()),
            ApiError::Gone(m) => (StatusCode::GONE, m.into()),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::TooManyRequests => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed attempts; try again later".into(),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is too large".into(),
            ),
            ApiError::Unavailable => {
                let body = json!({ "error": "the database is unavailable; try again shortly" });
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "5")],
                    Json(body),
                )
                    .into_response();
            }
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

impl From<flotilla_store::StoreError> for ApiError {
    fn from(e: flotilla_store::StoreError) -> Self {
        use flotilla_store::StoreError;
        match e {
            StoreError::NotFound => ApiError::NotFound("not found"),
            StoreError::Conflict(_) => ApiError::Conflict("already exists".into()),
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                ApiError::Unavailable
            }
            StoreError::Refused(cause) => ApiError::Internal(anyhow::anyhow!(cause)),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

/// Parses a JSON body that handlers read as bytes (an optional body); the same refusals as
/// [`JsonBody`].
pub fn parse_json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))?;
    refuse_nul(bytes)?;
    Ok(value)
}

fn refuse_nul(json: &[u8]) -> Result<(), ApiError> {
    if flotilla_proto::has_escaped_nul(json) {
        return Err(ApiError::BadRequest(
            "a string in the body holds a NUL character (\\u0000)".into(),
        ));
    }
    Ok(())
}

/// A JSON body extractor whose rejections use our error shape instead of axum's plain text.
/// A string holding NUL (`\u0000`) is refused here, at the edge: no field needs one, and
/// PostgreSQL's text type cannot store it.
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| {
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::BadRequest(
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::PayloadTooLarge);
            }
            Err(rejection) => return Err(ApiError::BadRequest(rejection.body_text())),
        };
        let value = Json::<T>::from_bytes(&bytes)
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
        refuse_nul(&bytes)?;
        Ok(JsonBody(value.0))
    }
}

/// Refuses a URL whose path or query decodes to a NUL character: PostgreSQL refuses such text
/// (SQLite would keep it), so it is bad input at the edge, never an error at commit.
pub async fn refuse_nul_in_url(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let encodes_nul = |s: &str| s.as_bytes().windows(3).any(|w| w == b"%00");
    let uri = req.uri();
    if encodes_nul(uri.path()) || uri.query().is_some_and(encodes_nul) {
        return ApiError::bad("the URL holds a NUL character (%00)").into_response();
    }
    next.run(req).await
}

/// Gives every 4xx answer the documented `{"error": "..."}` body, including the plain-text ones
/// axum's own extractors (path, query, raw body) produce.
pub async fn json_errors(resp: axum::response::Response) -> axum::response::Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => flotilla_proto::truncate_chars(t, 300).to_string(),
    };
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    (parts, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_store::Backend;
    use flotilla_store::testdb::{TestDb, dev};

    /// A write the database cannot take now (locked past the busy/lock timeout) answers 503
    /// with Retry-After on both engines; a duplicate answers 409.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unavailable_database_answers_503_and_a_duplicate_409() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut db = TestDb::new(backend).await;
            db.reopen_with_busy_timeout(std::time::Duration::from_millis(100))
                .await;
            db.with_devices(&["d"]).await;
            let store = db.store();
            let duplicate = store
                .create_user("o", "o@x", "h", flotilla_store::Role::Operator)
                .await
                .unwrap_err();
            let resp = ApiError::from(duplicate).into_response();
            assert_eq!(resp.status(), StatusCode::CONFLICT, "{backend:?}");

            let _locked = db.lock_writes().await;
            let e = store.mark_offline(&dev("d"), "x").await;
            // mark_offline writes devices, which the lock covers on both engines.
            let e = match e {
                Err(e) => e,
                Ok(changed) => panic!("{backend:?}: wrote through the lock ({changed})"),
            };
            assert!(e.is_unavailable(), "{backend:?}: {e}");
            let resp = ApiError::from(e).into_response();
            assert_eq!(
                resp.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{backend:?}"
            );
            assert_eq!(
                resp.headers().get(axum::http::header::RETRY_AFTER).unwrap(),
                "5"
            );
        }
    }
}
