//! Shared state and the user-facing router.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use flotilla_pki::CertificateAuthority;

use crate::auth::JwtKeys;
use crate::broker::BrokerControl;
use crate::broker::gate::DeviceGate;
use crate::commands::Dispatcher;
use crate::config::ServerConfig;
use crate::login_limits::{AnonymousLimiter, LoginLimiter};
use crate::ota::OtaService;
use crate::passwords::Passwords;
use crate::routes;
use flotilla_store::Store;

/// Largest request body the user API reads.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub jwt: Arc<JwtKeys>,
    pub limiter: Arc<LoginLimiter>,
    /// Login counts every replica shares; on PostgreSQL only.
    pub shared_limits: Option<crate::shared_limits::SharedLimits>,
    pub leadership: crate::leader::Leadership,
    pub passwords: Passwords,
    pub anonymous: Arc<AnonymousLimiter>,
    /// Registrations per source address.
    pub registrations: Arc<AnonymousLimiter>,
    pub ca: Arc<CertificateAuthority>,
    pub gate: Arc<DeviceGate>,
    pub broker: Arc<dyn BrokerControl>,
    pub dispatcher: Arc<Dispatcher>,
    pub ota: Arc<OtaService>,
    pub config: Arc<ServerConfig>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The ingest writer, for its queue depth.
    pub writer: crate::ingest::writer::Writer,
    pub command_waits: Arc<crate::command_waits::CommandWaits>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The user API (`--http-addr`).
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(routes::auth::router())
        .merge(routes::devices::router())
        .merge(routes::commands::router())
        .merge(routes::config::router())
        .merge(routes::admin::router())
        .merge(routes::audit::router())
        .merge(routes::provisioning::router())
        .merge(routes::releases::router())
        .merge(routes::ota::router())
        .merge(routes::rollouts::router())
        .merge(routes::meta::router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(crate::error::refuse_nul_in_url))
        .layer(axum::middleware::map_response(crate::error::json_errors))
        .with_state(state)
}
