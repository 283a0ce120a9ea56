//! Rollouts as stored: their parameters, targets and last known state. The planner that
//! drives them lives in memory (`crate::rollouts`) and is rebuilt from here at start-up.

use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::{Store, UpdateState, now_ms};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRow {
    pub id: String,
    pub version: String,
    pub config: Value,
    pub targets: Vec<String>,
    pub state: String,
    /// Zero-based phase the rollout was in at its last transition.
    pub phase: Option<i64>,
    pub created_by: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

fn rollout_from(r: &sqlx::any::AnyRow) -> sqlx::Result<RolloutRow> {
    let text = |c: &str| r.try_get::<String, _>(c);
    Ok(RolloutRow {
        id: text("id")?,
        version: text("version")?,
        config: serde_json::from_str(&text("config")?).unwrap_or(Value::Null),
        targets: serde_json::from_str(&text("targets")?).unwrap_or_default(),
        state: text("state")?,
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
    ) -> sqlx::Result<RolloutRow> {
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO rollouts (id, version, config, targets, state, created_by, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'scheduled', $5, $6, $7) RETURNING *",
        )
        .bind(id)
        .bind(version)
        .bind(config.to_string())
        .bind(serde_json::to_string(targets).unwrap_or_else(|_| "[]".into()))
        .bind(created_by)
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        rollout_from(&row)
    }

    pub async fn rollout(&self, id: &str) -> sqlx::Result<Option<RolloutRow>> {
        sqlx::query("SELECT * FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(rollout_from)
            .transpose()
    }

    pub async fn rollouts(&self) -> sqlx::Result<Vec<RolloutRow>> {
        sqlx::query("SELECT * FROM rollouts ORDER BY created_at DESC")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rollout_from)
            .collect()
    }

    pub async fn set_rollout_state(
        &self,
        id: &str,
        state: &str,
        phase: Option<usize>,
    ) -> sqlx::Result<()> {
        sqlx::query("UPDATE rollouts SET state = $1, phase = COALESCE($2, phase), updated_at = $3 WHERE id = $4")
            .bind(state)
            .bind(phase.map(|p| p as i64))
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How each target's update of this rollout ended so far (to rebuild the planner).
    pub async fn rollout_outcomes(&self, id: &str) -> sqlx::Result<Vec<(String, UpdateState)>> {
        sqlx::query(
            "SELECT device_id, state FROM ota_updates WHERE rollout_id = $1 ORDER BY created_at",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let state: String = r.try_get("state")?;
            Ok((r.try_get("device_id")?, UpdateState::parse(&state)))
        })
        .collect()
    }

    /// Device ids online right now, among `ids`.
    pub async fn online_devices(&self) -> sqlx::Result<Vec<String>> {
        sqlx::query_scalar("SELECT device_id FROM devices WHERE online = 1")
            .fetch_all(&self.pool)
            .await
    }
}
