//! HTTP handlers, one module per resource, each with its own `router()`.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod commands;
pub mod config;
pub mod devices;
pub mod firmware;
pub mod meta;
pub mod ota;
pub mod provisioning;
pub mod range;
pub mod releases;
pub mod renew;
pub mod rollouts;
pub mod sign_csr;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use crate::app::AppState;
use crate::auth::AuthUser;
use crate::error::ApiError;
use flotilla_store::{AuditRecord, DeviceRow};

/// The device if the caller may see it; otherwise 404, so another user's device ids are not
/// even confirmed to exist.
pub(crate) async fn visible_device(
    state: &AppState,
    user: &AuthUser,
    device_id: &str,
) -> Result<DeviceRow, ApiError> {
    let id = device_in_path(device_id)?;
    state
        .store
        .device_visible_to(&id, user.owner_filter())
        .await?
        .ok_or(ApiError::NotFound("no such device"))
}

/// A device id from a URL; one that is not valid names no device (404, as an unknown one).
pub(crate) fn device_in_path(device_id: &str) -> Result<flotilla_proto::DeviceId, ApiError> {
    flotilla_proto::DeviceId::parse(device_id).map_err(|_| ApiError::NotFound("no such device"))
}

/// Records what a user did, in the audit log.
pub(crate) async fn audit(
    state: &AppState,
    user: &AuthUser,
    action: &str,
    target: &str,
    result: &str,
    detail: Option<String>,
) {
    let actor = user.actor();
    state
        .store
        .audit(AuditRecord {
            actor: &actor,
            action,
            target: Some(target),
            result,
            detail,
        })
        .await;
}

/// The address the request came from (the TCP peer; `None` when the listener does not record
/// one, as in `oneshot` tests).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}
