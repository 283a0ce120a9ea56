//! `GET /firmware/{version}` on the device listener: the image, only to a device presenting
//! its current certificate and holding an open offer for that version; HTTP Range for resumes.
//! The image is streamed in small chunks (local disk or S3), so a download holds a few tens of
//! KiB of server memory.

use super::range::parse_range;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};

use crate::app::AppState;
use crate::device_listener::PeerIdentity;
use crate::error::ApiError;

pub fn router() -> Router<AppState> {
    Router::new().route("/firmware/{version}", get(download))
}

async fn download(
    State(state): State<AppState>,
    Extension(peer): Extension<PeerIdentity>,
    Path(version): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some((serial, device_id)) = peer.0 else {
        return Err(ApiError::Unauthorized);
    };
    // The same gate the broker applies: not blocked, and only the newest certificate.
    if state.gate.check(&device_id, Some(&serial)).is_err() {
        return Err(ApiError::Forbidden("device certificate not accepted"));
    }
    let release = super::releases::find(&state, &version).await?;
    if release.blocked {
        return Err(ApiError::Gone("release is blocked"));
    }
    if !release.ready
        || !state
            .store
            .has_open_update(
                &flotilla_proto::DeviceId::parse(&device_id)
                    .map_err(|_| ApiError::Forbidden("device certificate not accepted"))?,
                &release.version,
            )
            .await?
    {
        return Err(ApiError::Forbidden("no open update for this release"));
    }
    let size = release.size as u64;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => match parse_range(v.to_str().unwrap_or(""), size) {
            Some(r) => Some(r),
            None => {
                let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                resp.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}"))
                        .unwrap_or(HeaderValue::from_static("bytes */0")),
                );
                return Ok(resp);
            }
        },
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    let stream = state
        .ota
        .artifacts
        .range(&release.hardware, &release.version, start, len)
        .await?;
    let body = Body::from_stream(stream);
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", release.sha256)) {
        h.insert(header::ETAG, etag);
    }
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}
