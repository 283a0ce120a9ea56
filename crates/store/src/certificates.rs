//! The device certificates the CA issued and which of them are revoked, for what an external
//! broker must refuse: a CRL of revoked serials and an ACL that denies devices left without a
//! valid certificate or blocked (`flotilla-server broker-sync`). The embedded broker needs
//! neither: its gate compares each session's serial with the device's current one.

use flotilla_proto::DeviceId;
use sqlx::{Any, Row, Transaction};

use super::states::{RevokeReason, state};
use super::{Store, StoreResult, now_ms};

/// A serial the broker must refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCertificate {
    /// Lower-case hex, as the CA writes it.
    pub serial_hex: String,
    pub device_id: DeviceId,
    /// Unix ms.
    pub revoked_at: i64,
    pub reason: RevokeReason,
}

/// What an external broker must refuse now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerDenials {
    /// Devices that may not publish or subscribe: blocked, or revoked with no certificate
    /// issued since. Sorted.
    pub denied_devices: Vec<DeviceId>,
    /// Revoked certificates that have not expired yet (an expired one is refused anyway),
    /// by serial.
    pub revoked: Vec<RevokedCertificate>,
}

impl Store {
    /// Revokes `device_id`'s current certificate: the device holds none afterwards, so the
    /// embedded gate refuses its serial and an external broker's CRL lists it. Whether it had
    /// one; [`StoreError::NotFound`](crate::StoreError::NotFound) when there is no such device.
    pub async fn revoke_device_certificate(&self, device_id: &DeviceId) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let current: Option<Option<String>> =
            sqlx::query_scalar("SELECT cert_serial FROM devices WHERE device_id = $1")
                .bind(device_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(current) = current else {
            return Err(crate::StoreError::NotFound);
        };
        let Some(serial) = current else {
            return Ok(false);
        };
        // Only the serial read above: a certificate issued in between is not cleared unseen
        // (the caller gets a conflict and may revoke again).
        let cleared = sqlx::query(
            "UPDATE devices SET cert_serial = NULL, cert_not_after = NULL \
             WHERE device_id = $1 AND cert_serial = $2",
        )
        .bind(device_id.as_str())
        .bind(&serial)
        .execute(&mut *tx)
        .await?;
        if cleared.rows_affected() != 1 {
            return Err(crate::StoreError::Conflict(
                "the device was issued another certificate meanwhile"
                    .to_string()
                    .into(),
            ));
        }
        revoke_current_in(&mut tx, device_id, RevokeReason::Revoked).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// What an external broker must refuse, as of now.
    pub async fn broker_denials(&self) -> StoreResult<BrokerDenials> {
        let denied: Vec<String> = sqlx::query_scalar(
            "SELECT device_id FROM devices d WHERE d.blocked = 1 \
             OR (d.cert_serial IS NULL AND EXISTS \
                 (SELECT 1 FROM certificates c WHERE c.device_id = d.device_id)) \
             ORDER BY device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let rows = sqlx::query(
            "SELECT serial, device_id, revoked_at, revoke_reason FROM certificates \
             WHERE revoked_at IS NOT NULL AND not_after > $1 ORDER BY serial",
        )
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        let revoked = rows
            .iter()
            .map(|r| {
                let device_id: String = r.try_get("device_id")?;
                Ok(RevokedCertificate {
                    serial_hex: r.try_get("serial")?,
                    device_id: crate::parse_device_id(&device_id)?,
                    revoked_at: r.try_get("revoked_at")?,
                    reason: state(r, "revoke_reason")?,
                })
            })
            .collect::<StoreResult<_>>()?;
        Ok(BrokerDenials {
            denied_devices: denied
                .iter()
                .map(|d| crate::parse_device_id(d))
                .collect::<StoreResult<_>>()?,
            revoked,
        })
    }
}

/// Records a newly issued certificate of `device_id`, superseding the one it had.
pub(super) async fn record_issued_in(
    tx: &mut Transaction<'_, Any>,
    device_id: &DeviceId,
    serial_hex: &str,
    not_after_ms: i64,
) -> StoreResult<()> {
    revoke_current_in(tx, device_id, RevokeReason::Superseded).await?;
    sqlx::query(
        "INSERT INTO certificates (serial, device_id, not_after, issued_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(serial_hex)
    .bind(device_id.as_str())
    .bind(not_after_ms)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn revoke_current_in(
    tx: &mut Transaction<'_, Any>,
    device_id: &DeviceId,
    reason: RevokeReason,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE certificates SET revoked_at = $1, revoke_reason = $2 \
         WHERE device_id = $3 AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(reason.as_str())
    .bind(device_id.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
