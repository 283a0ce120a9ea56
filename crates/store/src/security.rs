//! The fleet security report: what an operator should look at before it becomes an outage
//! or a breach — certificates about to expire, devices refused by the broker that are still
//! marked online, devices in crash loops, devices provisioned and never seen since.

use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreResult};

/// A device whose current certificate ends before the report's horizon.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExpiringCertificate {
    pub device_id: String,
    pub serial: String,
    /// Unix ms.
    pub not_after: i64,
    /// A renewal was issued and not used yet.
    pub renewal_pending: bool,
    pub online: bool,
    pub last_seen: Option<i64>,
}

/// A device the broker must refuse (blocked, or revoked and not provisioned since) that its
/// last message says is online.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeniedDevice {
    pub device_id: String,
    pub blocked: bool,
    pub revoked: bool,
    pub last_seen: Option<i64>,
}

/// A device whose last heartbeat counted repeated crashed boots.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CrashingDevice {
    pub device_id: String,
    pub crashes: i64,
    pub uptime: Option<i64>,
    pub firmware_version: Option<String>,
    pub last_seen: Option<i64>,
}

/// A device that holds a certificate and never sent a message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NeverSeenDevice {
    pub device_id: String,
    pub name: String,
    /// Unix ms the device was registered.
    pub created_at: i64,
}

/// Each list holds at most the limit asked for, most urgent first.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecurityReport {
    pub expiring_certificates: Vec<ExpiringCertificate>,
    pub denied_but_connected: Vec<DeniedDevice>,
    pub crash_loops: Vec<CrashingDevice>,
    pub never_seen: Vec<NeverSeenDevice>,
}

impl Store {
    /// Certificates ending before `expiring_before_ms` (soonest first), refused devices,
    /// devices reporting at least `min_crashes` crashed boots (most first), and provisioned
    /// devices never seen (oldest first); at most `limit` of each. One read transaction.
    pub async fn security_report(
        &self,
        expiring_before_ms: i64,
        min_crashes: i64,
        limit: i64,
    ) -> StoreResult<SecurityReport> {
        let mut tx = self.begin_read().await?;
        let expiring = sqlx::query(
            "SELECT device_id, cert_serial, cert_not_after, cert_pending_serial, online, last_seen \
             FROM devices WHERE cert_serial IS NOT NULL AND cert_not_after < $1 \
             ORDER BY cert_not_after, device_id LIMIT $2",
        )
        .bind(expiring_before_ms)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(ExpiringCertificate {
                device_id: r.try_get("device_id")?,
                serial: r.try_get("cert_serial")?,
                not_after: r.try_get("cert_not_after")?,
                renewal_pending: r
                    .try_get::<Option<String>, _>("cert_pending_serial")?
                    .is_some(),
                online: r.try_get::<i64, _>("online")? != 0,
                last_seen: r.try_get("last_seen")?,
            })
        })
        .collect::<StoreResult<_>>()?;
        // The same rule as the broker denials (blocked, or revoked with nothing issued since),
        // among devices marked online: with an external broker, a sign that broker-sync is not
        // running; with the embedded one, which closes them at once, it stays empty.
        let denied = sqlx::query(
            "SELECT device_id, blocked, cert_serial, last_seen FROM devices d \
             WHERE d.online = 1 AND (d.blocked = 1 OR (d.cert_serial IS NULL AND EXISTS \
                 (SELECT 1 FROM certificates c WHERE c.device_id = d.device_id))) \
             ORDER BY last_seen DESC, device_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(DeniedDevice {
                device_id: r.try_get("device_id")?,
                blocked: r.try_get::<i64, _>("blocked")? != 0,
                revoked: r.try_get::<Option<String>, _>("cert_serial")?.is_none(),
                last_seen: r.try_get("last_seen")?,
            })
        })
        .collect::<StoreResult<_>>()?;
        let crash_loops = sqlx::query(
            "SELECT device_id, crashes, uptime, fw_version, last_seen FROM devices \
             WHERE crashes >= $1 ORDER BY crashes DESC, device_id LIMIT $2",
        )
        .bind(min_crashes)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(CrashingDevice {
                device_id: r.try_get("device_id")?,
                crashes: r.try_get("crashes")?,
                uptime: r.try_get("uptime")?,
                firmware_version: r.try_get("fw_version")?,
                last_seen: r.try_get("last_seen")?,
            })
        })
        .collect::<StoreResult<_>>()?;
        let never_seen = sqlx::query(
            "SELECT device_id, name, created_at FROM devices \
             WHERE cert_serial IS NOT NULL AND last_seen IS NULL \
             ORDER BY created_at, device_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(NeverSeenDevice {
                device_id: r.try_get("device_id")?,
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<StoreResult<_>>()?;
        tx.commit().await?;
        Ok(SecurityReport {
            expiring_certificates: expiring,
            denied_but_connected: denied,
            crash_loops,
            never_seen,
        })
    }
}
