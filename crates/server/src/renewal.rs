//! A renewed certificate becomes the device's only one when the device uses it: connecting to
//! the embedded broker with it, or `POST /renew/confirm` presenting it (the way with an
//! external broker, where the server does not see certificates). Until then the old one stays
//! valid, so a device that lost the answer to `/renew`, or lost power before storing it, still
//! connects.

use std::time::Duration;

use flotilla_proto::DeviceId;
use flotilla_store::{AuditRecord, Promotion, Store, StoreResult};

use crate::broker::gate::DeviceGate;

/// A device renews at most once in this time (a day, or a quarter of a certificate's life if
/// that is shorter): a device that lost an answer asks again later, and a compromised one adds
/// at most one revoked serial a day to the CRL.
pub fn min_renewal_interval(validity: Duration) -> Duration {
    (validity / 4).min(Duration::from_secs(86_400))
}

/// Makes `serial`, which `device_id` was issued by renewal and has just used (`how`), its
/// current certificate and revokes the one it renewed; audited.
pub async fn promote(
    store: &Store,
    gate: &DeviceGate,
    device_id: &DeviceId,
    serial: &str,
    how: &str,
) -> StoreResult<Promotion> {
    let promotion = store.promote_device_certificate(device_id, serial).await?;
    if let Promotion::Promoted { superseded } = &promotion {
        gate.refresh(store, device_id).await?;
        let actor = format!("device:{device_id}");
        let old = superseded.as_deref().unwrap_or("none");
        store
            .audit(AuditRecord {
                actor: &actor,
                action: "certificate.promote",
                target: Some(device_id.as_str()),
                result: "success",
                detail: Some(format!("serial {serial} replaces {old} ({how})")),
            })
            .await;
        tracing::info!(device_id = %device_id, serial, superseded = old, "renewed certificate in use");
    }
    Ok(promotion)
}
