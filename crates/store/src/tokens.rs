//! One-time provisioning tokens. Only a SHA-256 of each token is stored.

use flotilla_pki::IssuedCertificate;
use flotilla_proto::DeviceId;
use sqlx::Row;

use super::certificates::record_issued_in;
use super::devices::register_in;
use super::{Store, StoreResult, now_ms};

/// Why a token could not be redeemed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenClaim {
    /// Redeemed now, by this call alone.
    Claimed { owner_id: i64 },
    /// Unknown, already used or expired (one answer: a caller learns nothing more).
    Invalid,
    /// The token is bound to another device id.
    WrongDevice,
    /// The device id belongs to another user.
    DeviceTaken,
}

impl Store {
    pub async fn create_token(
        &self,
        token_hash: &str,
        owner: i64,
        device_id: Option<&DeviceId>,
        expires_at: i64,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO provisioning_tokens (token_hash, owner_id, device_id, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(token_hash)
            .bind(owner)
            .bind(device_id.map(DeviceId::as_str))
            .bind(expires_at)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// What redeeming the token would answer now, without changing anything: checked before
    /// any signing work, so a caller without a usable token costs one indexed read.
    pub async fn peek_token(
        &self,
        token_hash: &str,
        device_id: &DeviceId,
    ) -> StoreResult<TokenClaim> {
        let now = now_ms();
        let row = sqlx::query(
            "SELECT owner_id, device_id FROM provisioning_tokens WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let owner_id = match token_owner(row, device_id.as_str())? {
            Ok(owner) => owner,
            Err(refused) => return Ok(refused),
        };
        let owner: Option<i64> =
            sqlx::query_scalar("SELECT owner_id FROM devices WHERE device_id = $1")
                .bind(device_id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        if owner.is_some_and(|o| o != owner_id) {
            return Ok(TokenClaim::DeviceTaken);
        }
        Ok(TokenClaim::Claimed { owner_id })
    }

    /// Redeems a token for `device_id` and records the serial of the certificate issued for it,
    /// in one transaction: the conditional UPDATE lets exactly one of any number of concurrent
    /// callers win. On any refusal nothing changes and the token stays usable.
    pub async fn redeem_token(
        &self,
        token_hash: &str,
        device_id: &DeviceId,
        issued: &IssuedCertificate,
    ) -> StoreResult<TokenClaim> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE provisioning_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $3 \
             RETURNING owner_id, device_id",
        )
        .bind(now)
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let owner_id = match token_owner(row, device_id.as_str())? {
            Ok(owner) => owner,
            Err(refused) => return Ok(refused),
        };
        if !register_in(&mut tx, device_id.as_str(), device_id.as_str(), owner_id).await? {
            return Ok(TokenClaim::DeviceTaken);
        }
        sqlx::query(
            // A newly provisioned device numbers its messages afresh (its flash was erased, or
            // it is another board): the keys of the one before do not outrank it.
            "UPDATE devices SET cert_serial = $1, cert_not_after = $2, cert_pending_serial = NULL, \
             cert_pending_not_after = NULL, presence_ord = NULL, health_ord = NULL, \
             status_ord = NULL, fw_ord = NULL WHERE device_id = $3",
        )
        .bind(&issued.serial_hex)
        .bind(issued.not_after_unix * 1000)
        .bind(device_id.as_str())
        .execute(&mut *tx)
        .await?;
        record_issued_in(
            &mut tx,
            device_id,
            &issued.serial_hex,
            issued.not_after_unix * 1000,
        )
        .await?;
        tx.commit().await?;
        Ok(TokenClaim::Claimed { owner_id })
    }
}

/// The account a usable token row gives `device_id` to, or why it gives it to nobody.
fn token_owner(
    row: Option<sqlx::any::AnyRow>,
    device_id: &str,
) -> StoreResult<Result<i64, TokenClaim>> {
    let Some(row) = row else {
        return Ok(Err(TokenClaim::Invalid));
    };
    let owner_id: i64 = row.try_get("owner_id")?;
    let bound: Option<String> = row.try_get("device_id")?;
    if bound.is_some_and(|b| b != device_id) {
        return Ok(Err(TokenClaim::WrongDevice));
    }
    Ok(Ok(owner_id))
}
