//! User authentication: HS256 JWTs with the algorithm pinned and the `AuthUser` extractor
//! every endpoint uses. Passwords are in [`crate::passwords`], login limits in
//! [`crate::login_limits`].

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::error::ApiError;
use flotilla_store::Role;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: String,
    iat: u64,
    exp: u64,
}

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys").finish_non_exhaustive()
    }
}

impl JwtKeys {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl,
        }
    }

    pub fn issue(&self, user_id: i64, role: Role) -> anyhow::Result<String> {
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            role: role.as_str().into(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    /// The user id in a valid token. Only HS256 is accepted: `alg: none` and algorithm
    /// confusion are refused by the pinned validation.
    pub fn verify(&self, token: &str) -> Option<i64> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        data.claims.sub.parse().ok()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The authenticated caller, loaded fresh from the database on every request so a block or
/// role change takes effect at once.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: i64,
    pub email: String,
    pub role: Role,
}

impl AuthUser {
    /// Owner filter for device queries: admins see every device, others their own.
    pub fn owner_filter(&self) -> Option<i64> {
        (self.role != Role::Admin).then_some(self.id)
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden("admin role required"))
        }
    }

    /// Operators and admins may change things; viewers may only look.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.role == Role::Viewer {
            Err(ApiError::Forbidden("viewer role is read-only"))
        } else {
            Ok(())
        }
    }

    pub fn actor(&self) -> String {
        format!("user:{}", self.email)
    }
}

/// The token of an `Authorization: Bearer` header, trimmed.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let id = state.jwt.verify(token).ok_or(ApiError::Unauthorized)?;
        let user = state
            .store
            .user_by_id(id)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if user.blocked {
            return Err(ApiError::Forbidden("account is blocked"));
        }
        Ok(AuthUser {
            id: user.id,
            email: user.email,
            role: user.role,
        })
    }
}
