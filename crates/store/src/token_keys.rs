//! Public keys that verify user tokens (JWTs), by key id. Each replica publishes its own at
//! start; any replica reads one the first time it sees a token naming it.

use super::{Store, StoreResult, now_ms};

impl Store {
    /// Publishes a verification key; one already published under `kid` is kept as it is.
    pub async fn publish_token_key(&self, kid: &str, public_key_pem: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO jwt_keys (kid, public_key_pem, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (kid) DO NOTHING",
        )
        .bind(kid)
        .bind(public_key_pem)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every published key, as (kid, PEM).
    pub async fn token_keys(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT kid, public_key_pem FROM jwt_keys ORDER BY created_at DESC")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The PEM public key published under `kid`, if any.
    pub async fn token_key(&self, kid: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT public_key_pem FROM jwt_keys WHERE kid = $1")
                .bind(kid)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}
