//! Rollouts as stored: their parameters, targets and last known state. The planner that
//! drives them lives in memory (the server's `rollouts` module) and is rebuilt from here at start-up.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::params::{Params, ROWS_PER_STATEMENT};
use super::{RolloutState, Store, StoreResult, UpdateState, now_ms};

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

    pub async fn set_rollout_state(
        &self,
        id: &str,
        state: RolloutState,
        phase: Option<usize>,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE rollouts SET state = $1, phase = COALESCE($2, phase), updated_at = $3 WHERE id = $4")
            .bind(state.as_str())
            .bind(phase.map(|p| p as i64))
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
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

    /// Device ids online right now, among `ids`.
    pub async fn online_devices(&self) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT device_id FROM devices WHERE online = 1")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
