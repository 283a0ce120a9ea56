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

/// Why a device may not renew its certificate now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalRefusal {
    /// The certificate presented is not the device's current one: revoked, superseded, or
    /// the pending one (which needs no renewal).
    NotCurrent,
    Blocked,
    /// The device renewed less than the minimum interval ago.
    TooSoon {
        retry_after_ms: i64,
    },
}

/// What came of a device showing a certificate it was issued by renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// It is current now; `superseded` (the one it renewed) is revoked.
    Promoted { superseded: Option<String> },
    /// It already was.
    AlreadyCurrent,
    /// It is neither current nor pending (revoked, superseded, or the device is gone).
    Unknown,
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
        let mut tx = self.begin_immediate().await?;
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
            "UPDATE devices SET cert_serial = NULL, cert_not_after = NULL, \
             cert_pending_serial = NULL, cert_pending_not_after = NULL \
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

    /// Whether `device_id` may renew the certificate `presented_serial` now: `Ok(())` if so.
    /// A cheap read, so a refused request costs no signature; [`Store::renew_device_certificate`]
    /// decides again in its transaction.
    pub async fn renewal_refusal(
        &self,
        device_id: &DeviceId,
        presented_serial: &str,
        min_interval_ms: i64,
    ) -> StoreResult<Result<(), RenewalRefusal>> {
        let mut conn = self.pool.acquire().await?;
        renewal_check(&mut conn, device_id, presented_serial, min_interval_ms).await
    }

    /// Records `issued` as `device_id`'s pending certificate, renewing `presented_serial`,
    /// which stays valid until the device uses the new one ([`Store::promote_device_certificate`]).
    /// A pending certificate issued earlier and never used is revoked.
    pub async fn renew_device_certificate(
        &self,
        device_id: &DeviceId,
        presented_serial: &str,
        issued: &flotilla_pki::IssuedCertificate,
        min_interval_ms: i64,
    ) -> StoreResult<Result<(), RenewalRefusal>> {
        let mut tx = self.begin_immediate().await?;
        if let Err(refused) =
            renewal_check(&mut tx, device_id, presented_serial, min_interval_ms).await?
        {
            return Ok(Err(refused));
        }
        let not_after_ms = issued.not_after_unix.saturating_mul(1000);
        // Takes the device row's lock and checks again under it: of concurrent renewals one
        // passes, the others find the interval not over and are refused.
        let now = now_ms();
        let updated = sqlx::query(
            "UPDATE devices SET cert_pending_serial = $1, cert_pending_not_after = $2, \
             cert_renewed_at = $3 WHERE device_id = $4 AND cert_serial = $5 AND blocked = 0 \
             AND (cert_renewed_at IS NULL OR cert_renewed_at <= $6)",
        )
        .bind(&issued.serial_hex)
        .bind(not_after_ms)
        .bind(now)
        .bind(device_id.as_str())
        .bind(presented_serial)
        .bind(now.saturating_sub(min_interval_ms))
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            // Someone else changed the row since the check: say why, as of now.
            drop(tx);
            return Ok(
                match self
                    .renewal_refusal(device_id, presented_serial, min_interval_ms)
                    .await?
                {
                    Err(refusal) => Err(refusal),
                    Ok(()) => Err(RenewalRefusal::NotCurrent),
                },
            );
        }
        revoke_all_but_in(&mut tx, device_id, presented_serial).await?;
        insert_issued_in(&mut tx, device_id, &issued.serial_hex, not_after_ms).await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// `device_id` has shown its pending certificate `serial` (it connected with it): that one
    /// becomes current and every other certificate of the device is revoked as superseded.
    pub async fn promote_device_certificate(
        &self,
        device_id: &DeviceId,
        serial: &str,
    ) -> StoreResult<Promotion> {
        let mut tx = self.begin_immediate().await?;
        let row = sqlx::query(
            "SELECT cert_serial, cert_pending_serial FROM devices WHERE device_id = $1",
        )
        .bind(device_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Promotion::Unknown);
        };
        let current: Option<String> = row.try_get("cert_serial")?;
        if current.as_deref() == Some(serial) {
            return Ok(Promotion::AlreadyCurrent);
        }
        // A blocked device keeps the certificates it has; it does not swap them.
        let promoted = sqlx::query(
            "UPDATE devices SET cert_serial = cert_pending_serial, \
             cert_not_after = cert_pending_not_after, cert_pending_serial = NULL, \
             cert_pending_not_after = NULL \
             WHERE device_id = $1 AND cert_pending_serial = $2 AND blocked = 0",
        )
        .bind(device_id.as_str())
        .bind(serial)
        .execute(&mut *tx)
        .await?;
        if promoted.rows_affected() != 1 {
            // A concurrent promotion of the same serial (connect and confirm at once) may
            // have committed since the read: it is current then, not unknown.
            drop(tx);
            let now_current: Option<Option<String>> =
                sqlx::query_scalar("SELECT cert_serial FROM devices WHERE device_id = $1")
                    .bind(device_id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
            return Ok(match now_current.flatten().as_deref() == Some(serial) {
                true => Promotion::AlreadyCurrent,
                false => Promotion::Unknown,
            });
        }
        revoke_all_but_in(&mut tx, device_id, serial).await?;
        tx.commit().await?;
        Ok(Promotion::Promoted {
            superseded: current,
        })
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
    insert_issued_in(tx, device_id, serial_hex, not_after_ms).await
}

async fn insert_issued_in(
    tx: &mut Transaction<'_, Any>,
    device_id: &DeviceId,
    serial_hex: &str,
    not_after_ms: i64,
) -> StoreResult<()> {
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

/// Revokes, as superseded, every unrevoked certificate of `device_id` but `kept`.
async fn revoke_all_but_in(
    tx: &mut Transaction<'_, Any>,
    device_id: &DeviceId,
    kept: &str,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE certificates SET revoked_at = $1, revoke_reason = $2 \
         WHERE device_id = $3 AND revoked_at IS NULL AND serial <> $4",
    )
    .bind(now_ms())
    .bind(RevokeReason::Superseded.as_str())
    .bind(device_id.as_str())
    .bind(kept)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The refusal, if any, of a renewal of `presented_serial` now.
async fn renewal_check(
    conn: &mut sqlx::AnyConnection,
    device_id: &DeviceId,
    presented_serial: &str,
    min_interval_ms: i64,
) -> StoreResult<Result<(), RenewalRefusal>> {
    let row = sqlx::query(
        "SELECT cert_serial, blocked, cert_renewed_at FROM devices WHERE device_id = $1",
    )
    .bind(device_id.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(crate::StoreError::NotFound);
    };
    if row.try_get::<i64, _>("blocked")? != 0 {
        return Ok(Err(RenewalRefusal::Blocked));
    }
    let current: Option<String> = row.try_get("cert_serial")?;
    if current.as_deref() != Some(presented_serial) {
        return Ok(Err(RenewalRefusal::NotCurrent));
    }
    let last_renewed: Option<i64> = row.try_get("cert_renewed_at")?;
    if let Some(last) = last_renewed {
        let wait = last
            .saturating_add(min_interval_ms)
            .saturating_sub(now_ms());
        if wait > 0 {
            return Ok(Err(RenewalRefusal::TooSoon {
                retry_after_ms: wait,
            }));
        }
    }
    Ok(Ok(()))
}
