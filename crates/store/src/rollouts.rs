//! Rollouts as stored: their parameters, targets, and the planner's state — the rollout's
//! phase, halt and timers, and each target's state — saved after every decision together with
//! the offers it made, so a restarted or newly elected server restores the planner from here.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use sqlx::{Any, Transaction};

use super::ota::{NewOffer, Offered, UpdateRow, create_update_in};
use super::params::{Params, ROWS_PER_STATEMENT};
use super::{RolloutHalt, RolloutState, Store, StoreResult, TargetState, UpdateState, now_ms};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRow {
    pub id: String,
    pub version: String,
    pub config: Value,
    pub targets: Vec<String>,
    pub state: RolloutState,
    /// Zero-based phase the rollout was in at its last transition.
    pub phase: Option<i64>,
    pub halt: Option<RolloutHalt>,
    /// The last transition in words.
    pub reason: Option<String>,
    /// Wall-clock Unix ms when the current phase's offline targets are skipped.
    pub wait_until: Option<i64>,
    pub forgiven_failed: i64,
    pub forgiven_succeeded: i64,
    pub overrides: i64,
    /// An operator's request waiting for the leader: pause, resume or abort.
    pub control: Option<String>,
    pub created_by: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn rollout_from(r: &sqlx::any::AnyRow) -> StoreResult<RolloutRow> {
    let text = |c: &str| r.try_get::<String, _>(c);
    Ok(RolloutRow {
        id: text("id")?,
        version: text("version")?,
        config: serde_json::from_str(&text("config")?).unwrap_or(Value::Null),
        // Rows of their own (rollout_targets), filled in by the caller.
        targets: Vec::new(),
        state: super::states::state(r, "state")?,
        phase: r.try_get("phase")?,
        halt: super::states::optional_state(r, "halt")?,
        reason: r.try_get("reason")?,
        wait_until: r.try_get("wait_until")?,
        forgiven_failed: r.try_get("forgiven_failed")?,
        forgiven_succeeded: r.try_get("forgiven_succeeded")?,
        overrides: r.try_get("overrides")?,
        control: r.try_get("control")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    pub async fn create_rollout(
        &self,
        id: &str,
        version: &str,
        config: &Value,
        targets: &[String],
        created_by: i64,
    ) -> StoreResult<RolloutRow> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "INSERT INTO rollouts (id, version, config, state, created_by, created_at, updated_at) \
             VALUES ($1, $2, $3, 'scheduled', $4, $5, $6) RETURNING *",
        )
        .bind(id)
        .bind(version)
        .bind(config.to_string())
        .bind(created_by)
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        for (n, chunk) in targets.chunks(ROWS_PER_STATEMENT).enumerate() {
            let sql = format!(
                "INSERT INTO rollout_targets (rollout_id, position, device_id) VALUES {}",
                Params::for_connection(&tx).rows(chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for (i, device) in chunk.iter().enumerate() {
                let position = (n * ROWS_PER_STATEMENT + i) as i64;
                q = q.bind(id).bind(position).bind(device.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let mut rollout = rollout_from(&row)?;
        rollout.targets = targets.to_vec();
        Ok(rollout)
    }

    pub async fn rollout(&self, id: &str) -> StoreResult<Option<RolloutRow>> {
        let mut tx = self.begin_read().await?;
        let row = sqlx::query("SELECT * FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(mut rollout) = row.as_ref().map(rollout_from).transpose()? else {
            return Ok(None);
        };
        rollout.targets = sqlx::query_scalar(
            "SELECT device_id FROM rollout_targets WHERE rollout_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(rollout))
    }

    /// Every rollout, newest first, with its targets.
    pub async fn rollouts(&self) -> StoreResult<Vec<RolloutRow>> {
        let mut tx = self.begin_read().await?;
        let rows = sqlx::query("SELECT * FROM rollouts ORDER BY created_at DESC, id")
            .fetch_all(&mut *tx)
            .await?;
        let targets: Vec<(String, String)> = sqlx::query_as(
            "SELECT rollout_id, device_id FROM rollout_targets ORDER BY rollout_id, position",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_rollout = super::grouped(targets);
        rows.iter()
            .map(|r| {
                let mut rollout = rollout_from(r)?;
                rollout.targets = by_rollout.remove(&rollout.id).unwrap_or_default();
                Ok(rollout)
            })
            .collect()
    }

    /// Saves what the planner decided: the rollout's state, the targets that changed and the
    /// offers to send (recorded here, sent by the caller after the commit).
    pub async fn save_rollout(&self, save: &RolloutSave<'_>) -> StoreResult<SavedOffers> {
        let mut tx = self.pool.begin().await?;
        let offers = save_rollout_in(&mut tx, save).await?;
        tx.commit().await?;
        Ok(offers)
    }

    /// Each target's saved state, in target order.
    pub async fn rollout_targets(&self, id: &str) -> StoreResult<Vec<TargetRow>> {
        sqlx::query(
            "SELECT position, device_id, state, since FROM rollout_targets WHERE rollout_id = $1 \
             ORDER BY position",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(TargetRow {
                position: r.try_get("position")?,
                device_id: r.try_get("device_id")?,
                state: super::states::state(r, "state")?,
                since: r.try_get("since")?,
            })
        })
        .collect()
    }

    /// How many targets are in each state.
    pub async fn rollout_target_counts(&self, id: &str) -> StoreResult<Vec<(TargetState, i64)>> {
        sqlx::query(
            "SELECT state, COUNT(*) AS n FROM rollout_targets WHERE rollout_id = $1 \
             GROUP BY state ORDER BY state",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((super::states::state(r, "state")?, r.try_get("n")?)))
        .collect()
    }

    /// Rollouts the planner still drives (scheduled, running, paused), without their targets.
    pub async fn open_rollouts(&self) -> StoreResult<Vec<RolloutRow>> {
        sqlx::query(OPEN_ROLLOUTS)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rollout_from)
            .collect()
    }

    /// Targets saved as in flight whose latest update of this rollout has ended since
    /// (reported through any replica, or cancelled by another offer): `(position, outcome)`.
    pub async fn rollout_outcomes_in_flight(
        &self,
        id: &str,
    ) -> StoreResult<Vec<(i64, UpdateState)>> {
        sqlx::query(
            "SELECT t.position, u.state FROM rollout_targets t JOIN ota_updates u \
             ON u.rollout_id = t.rollout_id AND u.device_id = t.device_id \
             WHERE t.rollout_id = $1 AND t.state = 'in_flight' \
             AND u.state IN ('succeeded', 'failed', 'rolled_back', 'cancelled') \
             AND u.created_at = (SELECT MAX(l.created_at) FROM ota_updates l \
                 WHERE l.rollout_id = t.rollout_id AND l.device_id = t.device_id)",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("position")?, super::states::state(r, "state")?)))
        .collect()
    }

    /// Leaves an operator's pause, resume or abort for the leader (taken by a replica that
    /// does not lead). `false` if there is no such rollout.
    pub async fn request_rollout_control(
        &self,
        id: &str,
        op: &str,
        actor: &str,
    ) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE rollouts SET control = $1, control_actor = $2 WHERE id = $3")
                .bind(op)
                .bind(actor)
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A device's update of a rollout the planner no longer drives (stopped, aborted,
    /// completed — a late offer) ended: its target shows how. Open rollouts are the leader's
    /// to save.
    pub async fn record_late_outcome(
        &self,
        rollout_id: &str,
        device_id: &str,
        state: TargetState,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE rollout_targets SET state = $1, since = NULL \
             WHERE rollout_id = $2 AND device_id = $3 AND state IN ('in_flight', 'skipped') \
             AND EXISTS (SELECT 1 FROM rollouts WHERE id = $4 \
                 AND state IN ('completed', 'stopped', 'aborted'))",
        )
        .bind(state.as_str())
        .bind(rollout_id)
        .bind(device_id)
        .bind(rollout_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Withdraws the request `op` (answered by a refusal), unless another replaced it.
    pub async fn clear_rollout_control(&self, id: &str, op: &str) -> StoreResult<()> {
        sqlx::query("UPDATE rollouts SET control = NULL WHERE id = $1 AND control = $2")
            .bind(id)
            .bind(op)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Operators' requests waiting for the leader: `(rollout, op, actor)`.
    pub async fn rollout_controls(&self) -> StoreResult<Vec<(String, String, String)>> {
        Ok(sqlx::query_as(PENDING_CONTROLS)
            .fetch_all(&self.pool)
            .await?)
    }

    /// How each target's update of this rollout ended so far (to rebuild the planner).
    pub async fn rollout_outcomes(&self, id: &str) -> StoreResult<Vec<(String, UpdateState)>> {
        sqlx::query(
            "SELECT device_id, state FROM ota_updates WHERE rollout_id = $1 ORDER BY created_at, id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("device_id")?, super::states::state(r, "state")?)))
        .collect()
    }

    /// Device ids online right now.
    pub async fn online_devices(&self) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT device_id FROM devices WHERE online = 1")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The last heartbeat of each device whose heartbeat was received after `since` (ms),
    /// whichever replica stored it: what the leader's health gate reads. Indexed.
    pub async fn heartbeats_since(&self, since: i64) -> StoreResult<Vec<HeartbeatRow>> {
        let rows: Vec<(String, Option<i64>, Option<i64>, i64)> = sqlx::query_as(
            "SELECT device_id, crashes, uptime, health_at FROM devices WHERE health_at > $1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(device_id, crashes, uptime, received_at)| HeartbeatRow {
                device_id,
                crashes: crashes.and_then(|c| u32::try_from(c).ok()),
                uptime_s: uptime.and_then(|u| u64::try_from(u).ok()),
                received_at,
            })
            .collect())
    }
}

/// A device's last heartbeat as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRow {
    pub device_id: String,
    pub crashes: Option<u32>,
    pub uptime_s: Option<u64>,
    /// When the replica that stored it received it (ms).
    pub received_at: i64,
}

/// One target as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRow {
    pub position: i64,
    pub device_id: String,
    pub state: TargetState,
    /// Wall-clock Unix ms of the offer, while in flight.
    pub since: Option<i64>,
}

/// What the planner decided, to be saved in one transaction.
#[derive(Debug, Clone)]
pub struct RolloutSave<'a> {
    pub id: &'a str,
    pub state: RolloutState,
    pub phase: Option<usize>,
    pub halt: Option<RolloutHalt>,
    pub reason: Option<&'a str>,
    pub wait_until: Option<i64>,
    pub forgiven_failed: i64,
    pub forgiven_succeeded: i64,
    pub overrides: i64,
    /// Targets whose state changed: `(position, state, since)`.
    pub targets: Vec<(i64, TargetState, Option<i64>)>,
    pub offers: Vec<NewOffer<'a>>,
    /// The operator's request this decision answered, cleared unless another replaced it.
    pub answered_control: Option<&'a str>,
    /// The rollout ended: its offers not started yet are cancelled with this reason.
    pub cancel_unstarted: Option<&'a str>,
    /// What the decision did, for the audit log (its transitions), written with it.
    pub audit: Vec<super::AuditRecord<'a>>,
}

/// The offers a saved decision made, and the devices it could not offer to now.
#[derive(Debug, Default)]
pub struct SavedOffers {
    pub made: Vec<UpdateRow>,
    /// Working on another update (an operator's): not offered.
    pub busy: Vec<flotilla_proto::DeviceId>,
    /// Open updates cancelled by this save (unstarted offers of a halted rollout, or ones a
    /// new offer replaced): the devices are told.
    pub withdrawn: Vec<super::ota::Withdrawn>,
}

pub(super) async fn save_rollout_in(
    tx: &mut Transaction<'_, Any>,
    save: &RolloutSave<'_>,
) -> StoreResult<SavedOffers> {
    sqlx::query(
        "UPDATE rollouts SET state = $1, phase = COALESCE($2, phase), halt = $3, \
         reason = COALESCE($4, reason), wait_until = $5, forgiven_failed = $6, \
         forgiven_succeeded = $7, overrides = $8, updated_at = $9, \
         control = CASE WHEN control = $10 THEN NULL ELSE control END WHERE id = $11",
    )
    .bind(save.state.as_str())
    .bind(save.phase.map(|p| p as i64))
    .bind(save.halt.map(|h| h.as_str()))
    .bind(save.reason)
    .bind(save.wait_until)
    .bind(save.forgiven_failed)
    .bind(save.forgiven_succeeded)
    .bind(save.overrides)
    .bind(now_ms())
    .bind(save.answered_control)
    .bind(save.id)
    .execute(&mut **tx)
    .await?;
    for (position, state, since) in &save.targets {
        sqlx::query(
            "UPDATE rollout_targets SET state = $1, since = $2 WHERE rollout_id = $3 AND position = $4",
        )
        .bind(state.as_str())
        .bind(*since)
        .bind(save.id)
        .bind(*position)
        .execute(&mut **tx)
        .await?;
    }
    // A target the planner gave up on: its open offer counts as failed.
    let timed_out = format!(
        "UPDATE ota_updates SET state = 'failed', error = 'timed out', updated_at = $1 \
         WHERE rollout_id = $2 AND state IN {} AND device_id = \
         (SELECT device_id FROM rollout_targets WHERE rollout_id = $3 AND position = $4)",
        super::ota::OPEN
    );
    for (position, _, _) in save
        .targets
        .iter()
        .filter(|(_, s, _)| *s == TargetState::TimedOut)
    {
        sqlx::query(&timed_out)
            .bind(now_ms())
            .bind(save.id)
            .bind(save.id)
            .bind(*position)
            .execute(&mut **tx)
            .await?;
    }
    let mut withdrawn = Vec::new();
    if let Some(why) = save.cancel_unstarted {
        // Exactly the offers cancelled here (one a device starts meanwhile is not) were never
        // reached: their targets wait again, and an override offers them anew.
        let cancelled: Vec<(String, String)> = sqlx::query_as(
            "UPDATE ota_updates SET state = 'cancelled', error = $1, updated_at = $2 \
             WHERE rollout_id = $3 AND state = 'offered' RETURNING device_id, id",
        )
        .bind(why)
        .bind(now_ms())
        .bind(save.id)
        .fetch_all(&mut **tx)
        .await?;
        for (device, update_id) in &cancelled {
            if let Ok(device_id) = flotilla_proto::DeviceId::parse(device) {
                withdrawn.push(super::ota::Withdrawn {
                    device_id,
                    update_id: update_id.clone(),
                });
            }
            sqlx::query(
                "UPDATE rollout_targets SET state = 'waiting', since = NULL \
                 WHERE rollout_id = $1 AND device_id = $2 AND state = 'in_flight'",
            )
            .bind(save.id)
            .bind(device)
            .execute(&mut **tx)
            .await?;
        }
    }
    let mut saved = SavedOffers {
        withdrawn,
        ..SavedOffers::default()
    };
    for offer in &save.offers {
        match create_update_in(tx, offer).await? {
            Offered::Made(made) => {
                saved.made.push(made.update);
                saved.withdrawn.extend(made.withdrawn);
            }
            Offered::Busy(_) => {
                // Saved as waiting, not as an offer that was never made.
                sqlx::query(
                    "UPDATE rollout_targets SET state = 'waiting', since = NULL \
                     WHERE rollout_id = $1 AND device_id = $2 AND state = 'in_flight'",
                )
                .bind(save.id)
                .bind(offer.device_id.as_str())
                .execute(&mut **tx)
                .await?;
                saved.busy.push(offer.device_id.clone())
            }
        }
    }
    // Last, so the chain head's lock (which every audited action takes) is held only for
    // the rest of this transaction, not while the offers are written.
    for rec in &save.audit {
        super::audit::audit_in(tx, rec).await?;
    }
    Ok(saved)
}

/// Read by the leader every second (indexed: `rollouts_state`, `rollouts_pending_control`).
pub(super) const OPEN_ROLLOUTS: &str = "SELECT * FROM rollouts WHERE state IN ('scheduled', 'running', 'paused') ORDER BY created_at, id";
pub(super) const PENDING_CONTROLS: &str = "SELECT id, control, COALESCE(control_actor, '') \
     FROM rollouts WHERE control IS NOT NULL ORDER BY id";
