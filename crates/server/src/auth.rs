//! User authentication: ES256 JWTs with the algorithm pinned and the `AuthUser` extractor
//! every endpoint uses. Passwords are in [`crate::passwords`], login limits in
//! [`crate::login_limits`].
//!
//! Each server signs with a P-256 key of its own (`jwt.key` in its data dir, 0600) and names
//! it in the token's `kid`; the public half is published in the database, so any replica
//! verifies a token any replica issued, and the database holds no secret that could mint one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::app::AppState;
use crate::error::ApiError;
use flotilla_store::{Role, Store, StoreResult};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: String,
    iat: u64,
    exp: u64,
}

/// The signing key's file in the data dir.
pub const SIGNING_KEY_FILE: &str = "jwt.key";

/// Verification keys kept in memory at most.
const KNOWN_KEYS: usize = 256;
/// A token naming a key this server does not know makes it read the published keys again,
/// at most this often: unknown key ids cost the database one read per interval, however
/// many arrive.
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(5);

pub struct JwtKeys {
    kid: String,
    encoding: EncodingKey,
    /// Verification keys by kid, this server's and those of replicas seen so far.
    known: RwLock<HashMap<String, Arc<DecodingKey>>>,
    /// When the published keys were last read; held while they are read, so one read runs.
    reloaded: tokio::sync::Mutex<Option<std::time::Instant>>,
    store: Store,
    ttl: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The key id of a public key: the start of its SHA-256, in hex.
fn key_id(public_key_pem: &str) -> String {
    hex::encode(&sha2::Sha256::digest(public_key_pem.trim().as_bytes())[..8])
}

impl JwtKeys {
    /// Loads this server's signing key from `data_dir` (made on first start) and publishes
    /// its public key.
    pub async fn open(data_dir: &Path, store: Store, ttl: Duration) -> anyhow::Result<JwtKeys> {
        let path = data_dir.join(SIGNING_KEY_FILE);
        let private_pem = match std::fs::read_to_string(&path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let pem = key.serialize_pem();
                flotilla_pki::write_secret_file(&path, pem.as_bytes())?;
                pem
            }
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        let key = rcgen::KeyPair::from_pem(&private_pem)
            .map_err(|e| anyhow::anyhow!("{} is not a P-256 key: {e}", path.display()))?;
        let public_pem = key.public_key_pem();
        let kid = key_id(&public_pem);
        store.publish_token_key(&kid, &public_pem).await?;
        let decoding = Arc::new(DecodingKey::from_ec_pem(public_pem.as_bytes())?);
        Ok(JwtKeys {
            encoding: EncodingKey::from_ec_pem(private_pem.as_bytes())?,
            known: RwLock::new(HashMap::from([(kid.clone(), decoding)])),
            reloaded: tokio::sync::Mutex::new(None),
            kid,
            store,
            ttl,
        })
    }

    pub fn issue(&self, user_id: i64, role: Role) -> anyhow::Result<String> {
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            role: role.as_str().into(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }

    /// The user id in a valid token; `Ok(None)` for any token that is not. Only ES256 with a
    /// published key id is accepted: `alg: none`, HMAC with a public key as the secret, and a
    /// key the database does not know are all refused. An unknown key id costs at most one
    /// read of the published keys per [`RELOAD_AT_MOST_EVERY`], whoever sends it.
    pub async fn verify(&self, token: &str) -> StoreResult<Option<i64>> {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(None);
        };
        let Some(kid) = header
            .kid
            .filter(|k| header.alg == Algorithm::ES256 && is_key_id(k))
        else {
            return Ok(None);
        };
        let Some(key) = self.verification_key(&kid).await? else {
            return Ok(None);
        };
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .ok()
            .and_then(|data| data.claims.sub.parse().ok()))
    }

    fn known_key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    async fn verification_key(&self, kid: &str) -> StoreResult<Option<Arc<DecodingKey>>> {
        if let Some(key) = self.known_key(kid) {
            return Ok(Some(key));
        }
        let mut reloaded = self.reloaded.lock().await;
        // Another request may have read them while this one waited.
        if let Some(key) = self.known_key(kid) {
            return Ok(Some(key));
        }
        if reloaded.is_some_and(|at| at.elapsed() < RELOAD_AT_MOST_EVERY) {
            return Ok(None);
        }
        let published = self.store.token_keys().await?;
        *reloaded = Some(std::time::Instant::now());
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        for (id, pem) in published {
            if known.len() >= KNOWN_KEYS {
                break;
            }
            match DecodingKey::from_ec_pem(pem.as_bytes()) {
                Ok(key) => {
                    known.entry(id).or_insert_with(|| Arc::new(key));
                }
                Err(_) => tracing::warn!(kid = %id, "a published token key does not parse"),
            }
        }
        Ok(known.get(kid).cloned())
    }
}

/// What [`key_id`] makes: 16 lower-case hex digits.
fn is_key_id(kid: &str) -> bool {
    kid.len() == 16 && kid.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
        let id = state
            .jwt
            .verify(token)
            .await?
            .ok_or(ApiError::Unauthorized)?;
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
