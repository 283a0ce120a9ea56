//! Firmware updates on the server: releases (verified against the operator's public keys),
//! their images, offers on `devices/{id}/ota`, and what devices report back.
//!
//! An offer is stored before it is published and published again when its device comes back
//! online, until the device starts it; the device ignores a redelivered offer it is working on.

pub mod artifacts;
pub mod keys;

use std::sync::{Arc, OnceLock};

use flotilla_proto::{Channel, DeviceId, OtaCancel, OtaOffer, SignedManifest, Topic, encode};
use tokio::sync::mpsc;

use crate::downlink::Downlink;
use crate::rollouts;
use flotilla_store::{Finished, ReleaseRow, Store, UpdateRow, Withdrawn};

/// How long a cancel is sent again at each session start.
const CANCEL_RESEND_MS: i64 = 86_400_000;

pub use artifacts::Artifacts;
pub use keys::TrustedKeys;

/// Path of a release image on the device listener; devices resolve it against the backend
/// URL they already trust.
pub fn firmware_path(version: &str) -> String {
    format!("/firmware/{version}")
}

#[derive(Debug)]
pub struct OtaService {
    pub store: Store,
    pub keys: TrustedKeys,
    pub artifacts: Artifacts,
    downlink: OnceLock<Downlink>,
    rollouts: OnceLock<mpsc::Sender<rollouts::Event>>,
}

impl OtaService {
    pub fn new(store: Store, keys: TrustedKeys, artifacts: Artifacts) -> Arc<OtaService> {
        Arc::new(OtaService {
            store,
            keys,
            artifacts,
            downlink: OnceLock::new(),
            rollouts: OnceLock::new(),
        })
    }

    pub fn attach(&self, downlink: Downlink, rollouts: mpsc::Sender<rollouts::Event>) {
        let _ = self.downlink.set(downlink);
        let _ = self.rollouts.set(rollouts);
    }

    /// Records and sends an offer of `release` to a device.
    pub async fn offer(
        &self,
        device: &DeviceId,
        release: &ReleaseRow,
        force: bool,
        rollout_id: Option<&str>,
        created_by: Option<i64>,
    ) -> flotilla_store::StoreResult<UpdateRow> {
        let id = format!("ota-{}", hex::encode(rand::random::<[u8; 12]>()));
        let made = self
            .store
            .create_update(&flotilla_store::NewOffer {
                id: &id,
                device_id: device,
                version: &release.version,
                force,
                rollout_id,
                created_by,
                // Forcing also replaces an update the device started (one that is stuck).
                supersede_started: force,
            })
            .await?;
        self.withdraw(&made.withdrawn);
        self.publish(&made.update, release).await;
        Ok(made.update)
    }

    /// Cancels the device's open update with `why` and tells the device; `None` when it has
    /// none. A rollout that made it reads the cancellation from the database (its target
    /// waits again, not a failure).
    pub async fn cancel(
        &self,
        device: &DeviceId,
        why: &str,
    ) -> flotilla_store::StoreResult<Option<UpdateRow>> {
        let cancelled = self.store.cancel_open_update(device, why).await?;
        if let Some(u) = &cancelled {
            self.withdraw(&[Withdrawn {
                device_id: u.device_id.clone(),
                update_id: u.id.clone(),
            }]);
        }
        Ok(cancelled)
    }

    /// Tells devices their cancelled updates are withdrawn (`OtaCancel`), so one that started
    /// downloading stops. Sent again at each session start for a day ([`Self::resend_offers`]),
    /// for a device that was not connected; the firmware endpoint also refuses the image to
    /// a cancelled update, so a download resumed after a drop fails.
    pub fn withdraw(&self, withdrawn: &[Withdrawn]) {
        let Some(downlink) = self.downlink.get() else {
            return;
        };
        for w in withdrawn {
            let topic = Topic::new(&w.device_id, Channel::Ota);
            let cancel = OtaCancel {
                cancel: w.update_id.clone(),
            };
            if let Err(e) = downlink.publish(topic.as_str(), encode(&cancel), false) {
                tracing::warn!(error = %e, update = %w.update_id, "OTA cancel not sent");
            }
        }
    }

    /// Sends a recorded offer (stored first: a lost publish is re-sent at the next session).
    pub async fn publish(&self, update: &UpdateRow, release: &ReleaseRow) {
        let Some(downlink) = self.downlink.get() else {
            return;
        };
        let offer = OtaOffer {
            id: update.id.clone(),
            manifest: SignedManifest {
                manifest: release.manifest.clone(),
                signature: release.signature.clone(),
            },
            url: firmware_path(&release.version),
            force: update.force,
        };
        let topic = Topic::new(&update.device_id, Channel::Ota);
        if let Err(e) = downlink.publish(topic.as_str(), encode(&offer), false) {
            tracing::warn!(error = %e, update = %update.id, "OTA offer not sent now; it is sent when the device's next session starts");
        }
    }

    /// A device's session started (it subscribed to its offers): send again every offer it
    /// has not started, and the cancels of updates cancelled in the last day.
    pub async fn resend_offers(&self, device_id: &DeviceId) {
        let since = flotilla_store::now_ms() - CANCEL_RESEND_MS;
        match self.store.cancelled_updates_since(device_id, since).await {
            Ok(ids) => {
                let withdrawn: Vec<Withdrawn> = ids
                    .into_iter()
                    .map(|update_id| Withdrawn {
                        device_id: device_id.clone(),
                        update_id,
                    })
                    .collect();
                self.withdraw(&withdrawn);
            }
            Err(e) => tracing::warn!(error = %e, "loading cancelled updates failed"),
        }
        match self.store.unstarted_updates(device_id).await {
            Ok(updates) => {
                for u in &updates {
                    match self.store.release(&u.version).await {
                        Ok(Some(r)) if r.ready && !r.blocked => self.publish(u, &r).await,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "loading release failed"),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, device_id = %device_id, "loading pending offers failed")
            }
        }
    }

    /// A device came online: tell the rollouts.
    pub fn device_online(&self, device_id: &DeviceId) {
        // Never stall ingest behind the rollout task: a presence event it misses is caught by
        // its periodic look at who is online.
        if let Some(tx) = self.rollouts.get() {
            let _ = tx.try_send(rollouts::Event::DeviceOnline(device_id.to_string()));
        }
    }

    /// A device's report ended one of its updates.
    pub async fn finished(&self, f: Finished) {
        if f.rollout_id.is_some() {
            self.notify(rollouts::Event::Finished(f)).await;
        }
    }

    pub async fn notify(&self, event: rollouts::Event) {
        if let Some(tx) = self.rollouts.get() {
            let _ = tx.send(event).await;
        }
    }
}
