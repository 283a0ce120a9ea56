use flotilla_proto::DeviceId;
use flotilla_proto::truncate_chars as truncate;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;

use super::{CommandState, Store, StoreResult, now_ms};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandRow {
    pub id: String,
    pub device_id: DeviceId,
    pub name: String,
    pub args: Value,
    pub state: CommandState,
    pub created_at: i64,
    pub expires_at: i64,
    pub delivered_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub result: Option<Value>,
    pub error: Option<String>,
}

fn command_from(r: &sqlx::any::AnyRow) -> StoreResult<CommandRow> {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    let device_id: String = r.try_get("device_id")?;
    Ok(CommandRow {
        id: r.try_get("id")?,
        device_id: crate::parse_device_id(&device_id)?,
        name: r.try_get("name")?,
        args: json(r.try_get("args")?).unwrap_or(Value::Null),
        state: super::states::state(r, "state")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        delivered_at: r.try_get("delivered_at")?,
        completed_at: r.try_get("completed_at")?,
        result: json(r.try_get("result")?),
        error: r.try_get("error")?,
    })
}

impl Store {
    pub async fn create_command(
        &self,
        id: &str,
        device_id: &DeviceId,
        name: &str,
        args: &Value,
        created_by: i64,
        expires_at: i64,
    ) -> StoreResult<CommandRow> {
        let row = sqlx::query(
            "INSERT INTO commands (id, device_id, name, args, state, created_by, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7) RETURNING *",
        )
        .bind(id)
        .bind(device_id.as_str())
        .bind(name)
        .bind(args.to_string())
        .bind(created_by)
        .bind(now_ms())
        .bind(expires_at)
        .fetch_one(&self.pool)
        .await?;
        command_from(&row)
    }

    pub async fn command(&self, id: &str) -> StoreResult<Option<CommandRow>> {
        let row = sqlx::query("SELECT * FROM commands WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(command_from).transpose()
    }

    pub async fn commands_of(
        &self,
        device_id: &DeviceId,
        limit: i64,
    ) -> StoreResult<Vec<CommandRow>> {
        let rows = sqlx::query(
            "SELECT * FROM commands WHERE device_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(device_id.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(command_from).collect()
    }

    /// Commands still waiting for the device, oldest first.
    pub async fn pending_commands(&self, device_id: &DeviceId) -> StoreResult<Vec<CommandRow>> {
        let rows = sqlx::query("SELECT * FROM commands WHERE device_id = $1 AND state = 'queued' AND expires_at > $2 ORDER BY created_at, id")
            .bind(device_id.as_str())
            .bind(now_ms())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(command_from).collect()
    }

    /// Queued commands of online devices not sent since `sent_before` (a command never
    /// marked sent counts from its creation, so one whose first publish is still under way on
    /// another replica is not sent twice): what the resender publishes again, oldest first, at
    /// most `limit`. Found through the expiry index (`state`), so a sweep with nothing queued
    /// reads nothing.
    pub async fn commands_to_resend(
        &self,
        sent_before: i64,
        limit: i64,
    ) -> StoreResult<Vec<CommandRow>> {
        let rows = sqlx::query(
            "SELECT c.* FROM commands c JOIN devices d ON d.device_id = c.device_id \
             WHERE c.state = 'queued' AND c.expires_at > $1 AND d.online = 1 \
             AND COALESCE(c.sent_at, c.created_at) < $2 \
             ORDER BY c.created_at, c.id LIMIT $3",
        )
        .bind(now_ms())
        .bind(sent_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(command_from).collect()
    }

    pub async fn mark_command_sent(&self, id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE commands SET sent_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a device's reply. Only the device the command was for can move it, and final
    /// states never change again. Returns whether anything changed.
    pub(super) async fn apply_reply(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        device_id: &str,
        reply: &flotilla_proto::CommandReply,
        now: i64,
    ) -> StoreResult<bool> {
        use flotilla_proto::CommandStatus;
        let r = match reply.status {
            CommandStatus::Accepted => {
                sqlx::query("UPDATE commands SET state = 'delivered', delivered_at = $1 WHERE id = $2 AND device_id = $3 AND state = 'queued'")
                    .bind(now)
                    .bind(&reply.id)
                    .bind(device_id)
                    .execute(&mut **tx)
                    .await?
            }
            CommandStatus::Succeeded | CommandStatus::Failed => {
                let state = if reply.status == CommandStatus::Succeeded { "succeeded" } else { "failed" };
                sqlx::query(
                    "UPDATE commands SET state = $1, completed_at = $2, delivered_at = COALESCE(delivered_at, $3), result = $4, error = $5 \
                     WHERE id = $6 AND device_id = $7 AND state IN ('queued', 'delivered')",
                )
                .bind(state)
                .bind(now)
                .bind(now)
                .bind(reply.result.as_ref().map(|v| v.to_string()))
                .bind(reply.error.as_deref().map(|e| truncate(e, 500)))
                .bind(&reply.id)
                .bind(device_id)
                .execute(&mut **tx)
                .await?
            }
        };
        Ok(r.rows_affected() == 1)
    }

    /// Expires open commands past their deadline. Looks first with a read (indexed), so a
    /// sweep with nothing to do never takes the write lock ingest needs.
    pub async fn expire_commands(&self) -> StoreResult<u64> {
        let mut conn = self.pool.acquire().await?;
        expire_commands_in(&mut conn).await
    }
}

/// Expires open commands past their deadline; looks first with a read (indexed), so a sweep
/// with nothing to do never takes the write lock ingest needs.
pub(super) async fn expire_commands_in(conn: &mut sqlx::AnyConnection) -> StoreResult<u64> {
    let now = now_ms();
    let due: Option<i64> = sqlx::query_scalar(OPEN_COMMAND_DUE)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
    if due.is_none() {
        return Ok(0);
    }
    let r = sqlx::query("UPDATE commands SET state = 'expired', completed_at = $1 WHERE state IN ('queued', 'delivered') AND expires_at <= $2")
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected())
}

/// Whether an open command is past its deadline.
pub(super) const OPEN_COMMAND_DUE: &str =
    "SELECT 1 FROM commands WHERE state IN ('queued', 'delivered') AND expires_at <= $1 LIMIT 1";
