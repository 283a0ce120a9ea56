//! The device twin: the configuration an operator wants a device to run with, and the one it
//! reports (written by ingest from its status message, [`crate::DeviceUpdate::Status`]).

use flotilla_proto::{DesiredConfig, DeviceId};
use sqlx::Row;

use super::{Store, StoreError, StoreResult, now_ms};

/// Both halves of a device's twin, with when each last changed (Unix ms).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigRow {
    pub desired: Option<DesiredConfig>,
    pub desired_at: Option<i64>,
    pub reported: Option<DesiredConfig>,
    pub reported_at: Option<i64>,
}

fn parse(column: &str, stored: Option<String>) -> StoreResult<Option<DesiredConfig>> {
    stored
        .map(|json| {
            serde_json::from_str(&json).map_err(|e| {
                StoreError::Refused(format!("stored {column} is not a configuration: {e}").into())
            })
        })
        .transpose()
}

impl Store {
    /// Replaces what `device_id` should run with; `false` if there is no such device.
    pub async fn set_desired_config(
        &self,
        device_id: &DeviceId,
        config: &DesiredConfig,
    ) -> StoreResult<bool> {
        let json =
            serde_json::to_string(config).map_err(|e| StoreError::Refused(e.to_string().into()))?;
        let r = sqlx::query(
            "UPDATE devices SET desired_config = $1, desired_config_at = $2 WHERE device_id = $3",
        )
        .bind(json)
        .bind(now_ms())
        .bind(device_id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `None` if there is no such device.
    pub async fn device_config(&self, device_id: &DeviceId) -> StoreResult<Option<ConfigRow>> {
        let row = sqlx::query(
            "SELECT desired_config, desired_config_at, reported_config, reported_config_at \
             FROM devices WHERE device_id = $1",
        )
        .bind(device_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        Ok(Some(ConfigRow {
            desired: parse("desired_config", r.try_get("desired_config")?)?,
            desired_at: r.try_get("desired_config_at")?,
            reported: parse("reported_config", r.try_get("reported_config")?)?,
            reported_at: r.try_get("reported_config_at")?,
        }))
    }
}
