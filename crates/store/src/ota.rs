//! Per-device OTA updates and their history: every offer, and every status the device reported.

use flotilla_proto::DeviceId;
use flotilla_proto::{OtaPhase, OtaStatus, truncate_chars};
use serde::Serialize;
use sqlx::{Any, Row, Transaction};

use super::{Store, StoreResult, UpdateState, now_ms};

/// States an update is still open in (SQL list).
pub(super) const OPEN: &str = "('offered', 'started', 'in_progress')";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRow {
    pub id: String,
    pub device_id: DeviceId,
    pub version: String,
    pub force: bool,
    pub rollout_id: Option<String>,
    pub state: UpdateState,
    pub progress: Option<i64>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn update_from(r: &sqlx::any::AnyRow) -> StoreResult<UpdateRow> {
    let device_id: String = r.try_get("device_id")?;
    Ok(UpdateRow {
        id: r.try_get("id")?,
        device_id: crate::parse_device_id(&device_id)?,
        version: r.try_get("version")?,
        force: r.try_get::<i64, _>("force")? != 0,
        rollout_id: r.try_get("rollout_id")?,
        state: super::states::state(r, "state")?,
        progress: r.try_get("progress")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateEvent {
    pub at: i64,
    pub status: String,
    pub progress: Option<i64>,
    pub version: Option<String>,
    pub error: Option<String>,
}

/// A device's report that ended (or moved) an update, for the rollout planner.
#[derive(Debug, Clone)]
pub struct Finished {
    pub device_id: DeviceId,
    pub rollout_id: Option<String>,
    pub state: UpdateState,
}

/// An open update the server cancelled (replaced by a newer offer, or cancelled by an
/// operator or a halted rollout): the device is told, in case it started it meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withdrawn {
    pub device_id: DeviceId,
    pub update_id: String,
}

/// A recorded offer and the open updates it replaced.
#[derive(Debug, Clone)]
pub struct MadeOffer {
    pub update: UpdateRow,
    pub withdrawn: Vec<Withdrawn>,
}

/// An offer of a release to one device, as recorded before it is sent.
#[derive(Debug, Clone)]
pub struct NewOffer<'a> {
    pub id: &'a str,
    pub device_id: &'a DeviceId,
    pub version: &'a str,
    pub force: bool,
    pub rollout_id: Option<&'a str>,
    pub created_by: Option<i64>,
    /// Replace an update the device has started (a rollout's offer) instead of refusing.
    pub supersede_started: bool,
}

impl Store {
    /// Records a new offer, replacing (cancelling) any open one for the device that it has not
    /// started — or, unless `offer.supersede_started`, refusing (conflict) while the device is
    /// working on one.
    pub async fn create_update(&self, offer: &NewOffer<'_>) -> StoreResult<MadeOffer> {
        let mut tx = self.pool.begin().await?;
        match create_update_in(&mut tx, offer).await? {
            Offered::Made(made) => {
                tx.commit().await?;
                Ok(made)
            }
            Offered::Busy(why) => Err(super::StoreError::Conflict(why.into())),
        }
    }

    /// Cancels the device's open update with `why`; `None` when it has none. One whose image
    /// is all downloaded (progress 100: installed, or about to boot) is past recall: a
    /// conflict, and its outcome follows from the device. The device is to be told
    /// ([`Withdrawn`]); its planner reads the cancellation.
    pub async fn cancel_open_update(
        &self,
        device_id: &DeviceId,
        why: &str,
    ) -> StoreResult<Option<UpdateRow>> {
        let mut tx = self.pool.begin().await?;
        super::devices::lock_device(&mut tx, device_id.as_str()).await?;
        let row = sqlx::query(&format!(
            "UPDATE ota_updates SET state = 'cancelled', error = $1, updated_at = $2 \
             WHERE device_id = $3 AND state IN {OPEN} \
             AND NOT (state = 'in_progress' AND COALESCE(progress, 0) >= 100) RETURNING *"
        ))
        .bind(truncate_chars(why, 200))
        .bind(now_ms())
        .bind(device_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_none() {
            let installed: Option<(String,)> = sqlx::query_as(&format!(
                "SELECT id FROM ota_updates WHERE device_id = $1 AND state IN {OPEN} LIMIT 1"
            ))
            .bind(device_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((id,)) = installed {
                return Err(super::StoreError::Conflict(
                    format!("update {id} is downloaded and installing: its outcome follows").into(),
                ));
            }
        }
        tx.commit().await?;
        row.as_ref().map(update_from).transpose()
    }

    /// Ids of the device's updates cancelled at or after `since_ms` (at most 10, newest first).
    pub async fn cancelled_updates_since(
        &self,
        device_id: &DeviceId,
        since_ms: i64,
    ) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM ota_updates WHERE device_id = $1 AND state = 'cancelled' \
             AND updated_at >= $2 ORDER BY updated_at DESC LIMIT 10",
        )
        .bind(device_id.as_str())
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Offers the device has not acted on yet: re-sent when it comes back online.
    pub async fn unstarted_updates(&self, device_id: &DeviceId) -> StoreResult<Vec<UpdateRow>> {
        sqlx::query("SELECT * FROM ota_updates WHERE device_id = $1 AND state = 'offered'")
            .bind(device_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(update_from)
            .collect()
    }

    /// Whether the device holds an open offer for `version` (what entitles it to download).
    pub async fn has_open_update(&self, device_id: &DeviceId, version: &str) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM ota_updates WHERE device_id = $1 AND version = $2 AND state IN {OPEN}"
        ))
        .bind(device_id.as_str())
        .bind(version)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    /// A device's updates, newest first, each with its reported events.
    pub async fn update_history(
        &self,
        device_id: &DeviceId,
        limit: i64,
    ) -> StoreResult<Vec<(UpdateRow, Vec<UpdateEvent>)>> {
        let mut tx = self.begin_read().await?;
        let updates = sqlx::query(
            "SELECT * FROM ota_updates WHERE device_id = $1 ORDER BY created_at DESC, id LIMIT $2",
        )
        .bind(device_id.as_str())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(updates.len());
        for u in &updates {
            let update = update_from(u)?;
            let events = sqlx::query("SELECT * FROM ota_events WHERE update_id = $1 ORDER BY id")
                .bind(&update.id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| {
                    Ok(UpdateEvent {
                        at: r.try_get("at")?,
                        status: r.try_get("status")?,
                        progress: r.try_get("progress")?,
                        version: r.try_get("version")?,
                        error: r.try_get("error")?,
                    })
                })
                .collect::<StoreResult<Vec<_>>>()?;
            out.push((update, events));
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Cancels the open offers of a rollout (after abort or a stop), so none is re-sent.
    pub async fn cancel_rollout_updates(&self, rollout_id: &str, why: &str) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE ota_updates SET state = 'cancelled', error = $1, updated_at = $2 \
             WHERE rollout_id = $3 AND state = 'offered'",
        )
        .bind(why)
        .bind(now_ms())
        .bind(rollout_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The rollout gave up waiting for this device: its open offer counts as failed.
    pub async fn time_out_update(&self, rollout_id: &str, device_id: &DeviceId) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE ota_updates SET state = 'failed', error = 'timed out', updated_at = $1 \
             WHERE rollout_id = $2 AND device_id = $3 AND state IN {OPEN}"
        ))
        .bind(now_ms())
        .bind(rollout_id)
        .bind(device_id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Running firmware versions and how many devices run each.
    pub async fn version_distribution(
        &self,
        owner: Option<i64>,
    ) -> StoreResult<Vec<(Option<String>, i64)>> {
        let rows = sqlx::query(
            "SELECT fw_version, COUNT(*) AS n FROM devices WHERE ($1 IS NULL OR owner_id = $2) \
             GROUP BY fw_version ORDER BY n DESC, COALESCE(fw_version, '')",
        )
        .bind(owner)
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("fw_version")?, r.try_get("n")?)))
            .collect()
    }
}

/// Applies a device's `ota/status` report inside the ingest transaction. Reports name their
/// offer by id; one that names no open offer of this device changes nothing. Returns the
/// update when the report finished it.
pub(super) async fn apply_ota_status(
    tx: &mut Transaction<'_, Any>,
    device: &DeviceId,
    status: &OtaStatus,
    now: i64,
) -> StoreResult<Option<Finished>> {
    let device_id = device.as_str();
    let Some(id) = status.id.as_deref() else {
        return Ok(None);
    };
    // The device row first, as every other writer of a device's offers locks it: the same
    // lock order everywhere, so ingest and a new offer cannot deadlock.
    super::devices::lock_device(tx, device_id).await?;
    let row = sqlx::query("SELECT * FROM ota_updates WHERE id = $1 AND device_id = $2")
        .bind(id)
        .bind(device_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(update) = row.as_ref().map(update_from).transpose()? else {
        return Ok(None);
    };
    let error = status.error.as_deref().map(|e| truncate_chars(e, 200));
    let version = status.version.as_deref().map(|v| truncate_chars(v, 32));
    sqlx::query("INSERT INTO ota_events (update_id, at, status, progress, version, error) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(id)
        .bind(now)
        .bind(phase_name(status.status))
        .bind(status.progress.map(i64::from))
        .bind(version)
        .bind(error)
        .execute(&mut **tx)
        .await?;
    if update.state.is_final() {
        return Ok(None);
    }
    let mut next = match status.status {
        OtaPhase::Started => UpdateState::Started,
        OtaPhase::InProgress => UpdateState::InProgress,
        OtaPhase::Success => UpdateState::Succeeded,
        OtaPhase::Failed => UpdateState::Failed,
        OtaPhase::RolledBack => UpdateState::RolledBack,
    };
    let mut error = error.map(str::to_string);
    // Success means the new version booted, confirmed and reconnected: it must be the one offered.
    if next == UpdateState::Succeeded && version != Some(update.version.as_str()) {
        next = UpdateState::Failed;
        error = Some(format!(
            "device reports version {} instead of {}",
            version.unwrap_or("none"),
            update.version
        ));
    }
    // Only an open update moves: one finished (cancelled, timed out) since the read above
    // stays as it is.
    let moved = sqlx::query(&format!(
        "UPDATE ota_updates SET state = $1, progress = COALESCE($2, progress), error = COALESCE($3, error), \
         updated_at = $4 WHERE id = $5 AND state IN {OPEN}"
    ))
    .bind(next.as_str())
    .bind(status.progress.map(i64::from))
    .bind(error)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(None);
    }
    Ok(next.is_final().then(|| Finished {
        device_id: device.clone(),
        rollout_id: update.rollout_id,
        state: next,
    }))
}

fn phase_name(p: OtaPhase) -> &'static str {
    match p {
        OtaPhase::Started => "STARTED",
        OtaPhase::InProgress => "IN_PROGRESS",
        OtaPhase::Success => "SUCCESS",
        OtaPhase::Failed => "FAILED",
        OtaPhase::RolledBack => "ROLLED_BACK",
    }
}

/// Records a new offer in `tx`, replacing (cancelling) any open one for the device.
/// What recording an offer came to.
pub(super) enum Offered {
    Made(MadeOffer),
    /// Not recorded, nothing written: the device is working on another update.
    Busy(String),
}

pub(super) async fn create_update_in(
    tx: &mut Transaction<'_, Any>,
    offer: &NewOffer<'_>,
) -> StoreResult<Offered> {
    let now = now_ms();
    // Two offers at once (an operator's and a rollout's) take turns: each cancels the one
    // before it. The schema keeps at most one open offer per device (ota_updates_one_open).
    super::devices::lock_device(tx, offer.device_id.as_str()).await?;
    let replaced = if offer.supersede_started {
        OPEN
    } else {
        "('offered')"
    };
    let withdrawn: Vec<String> = sqlx::query_scalar(&format!(
        "UPDATE ota_updates SET state = 'cancelled', error = 'superseded by a newer offer', updated_at = $1 \
         WHERE device_id = $2 AND state IN {replaced} RETURNING id"
    ))
    .bind(now)
    .bind(offer.device_id.as_str())
    .fetch_all(&mut **tx)
    .await?;
    // Checked after the first write, which on SQLite takes the write lock (a read first would
    // make the transaction a reader that cannot upgrade while another writes). A refusal has
    // changed nothing: the update cancelled above is only an unstarted one, and there is none
    // beside a started one (one open update per device).
    if !offer.supersede_started {
        let busy: Option<(String, String)> = sqlx::query_as(
            "SELECT id, state FROM ota_updates WHERE device_id = $1 \
             AND state IN ('started', 'in_progress') LIMIT 1",
        )
        .bind(offer.device_id.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((id, state)) = busy {
            return Ok(Offered::Busy(format!(
                "the device is working on update {id} ({state})"
            )));
        }
    }
    let row = sqlx::query(
        "INSERT INTO ota_updates (id, device_id, version, force, rollout_id, state, created_by, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, 'offered', $6, $7, $8) RETURNING *",
    )
    .bind(offer.id)
    .bind(offer.device_id.as_str())
    .bind(offer.version)
    .bind(i64::from(offer.force))
    .bind(offer.rollout_id)
    .bind(offer.created_by)
    .bind(now)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Offered::Made(MadeOffer {
        update: update_from(&row)?,
        withdrawn: withdrawn
            .into_iter()
            .map(|update_id| Withdrawn {
                device_id: offer.device_id.clone(),
                update_id,
            })
            .collect(),
    }))
}
