//! What ingest and the broker keep besides device state: messages that could not be stored
//! (dead letters) and the retained messages the server publishes.

use flotilla_proto::DeviceId;
use sqlx::{Any, Transaction};

use super::{Store, StoreResult, now_ms};

/// A retained message kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRow {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
}

/// One ingest transaction: what devices sent, applied in order, durable at [`WriteTx::commit`]
/// and gone if it is dropped first. After any error, drop it: PostgreSQL refuses every later
/// statement of a transaction that failed one, SQLite would go on.
#[must_use = "nothing is stored until it is committed"]
pub struct WriteTx(Transaction<'static, Any>);

impl WriteTx {
    /// Applies a heartbeat, status or single telemetry reading received at `received` (ms,
    /// this replica's clock). What it reports changes the device only where no message
    /// received later changed it already (one device's messages may be committed out of
    /// order by two replicas); true when the device came online with it.
    pub async fn apply_update(
        &mut self,
        device: &DeviceId,
        update: &super::DeviceUpdate,
        received: i64,
    ) -> StoreResult<bool> {
        super::devices::apply_update(&mut self.0, device.as_str(), update, received).await
    }

    /// Stores telemetry readings, each with its receive time (ms), in a few multi-row
    /// statements, as [`WriteTx::apply_update`] would one at a time; the devices that came
    /// online.
    pub async fn apply_readings(
        &mut self,
        readings: &[(&DeviceId, &flotilla_proto::Telemetry, i64)],
    ) -> StoreResult<Vec<DeviceId>> {
        let readings: Vec<_> = readings
            .iter()
            .map(|(d, t, at)| (d.as_str(), *t, *at))
            .collect();
        let came_online = super::devices::apply_readings(&mut self.0, &readings).await?;
        came_online
            .iter()
            .map(|d| crate::parse_device_id(d))
            .collect()
    }

    /// Applies a device's reply to a command; false when it matched no command waiting for one.
    pub async fn apply_reply(
        &mut self,
        device: &DeviceId,
        reply: &flotilla_proto::CommandReply,
        now: i64,
    ) -> StoreResult<bool> {
        Store::apply_reply(&mut self.0, device.as_str(), reply, now).await
    }

    /// Applies an OTA status report; the update it finished, if it did.
    pub async fn apply_ota_status(
        &mut self,
        device: &DeviceId,
        status: &flotilla_proto::OtaStatus,
        now: i64,
    ) -> StoreResult<Option<super::Finished>> {
        super::ota::apply_ota_status(&mut self.0, device, status, now).await
    }

    pub async fn commit(self) -> StoreResult<()> {
        Ok(self.0.commit().await?)
    }
}

impl Store {
    /// A write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`), so
    /// a second writer waits in the busy timeout instead of failing when its read upgrades;
    /// PostgreSQL locks the rows it writes.
    pub async fn begin_write(&self) -> StoreResult<WriteTx> {
        Ok(WriteTx(self.begin_immediate().await?))
    }

    /// A transaction that reads then writes: on SQLite it takes the write lock at once, so
    /// a commit by another writer between its read and its write cannot fail it
    /// (SQLITE_BUSY_SNAPSHOT); PostgreSQL's row locks do that job there.
    pub(super) async fn begin_immediate(&self) -> StoreResult<Transaction<'static, Any>> {
        Ok(match self.backend {
            super::Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            super::Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// A transaction for several reads that must agree (one snapshot): SQLite's deferred
    /// transaction reads one snapshot already; PostgreSQL's default (read committed) takes a
    /// new one per statement, so it is asked for repeatable read.
    pub(super) async fn begin_read(&self) -> StoreResult<Transaction<'static, Any>> {
        match self.backend {
            super::Backend::Sqlite => Ok(self.pool.begin().await?),
            super::Backend::Postgres => Ok(self
                .pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?),
        }
    }

    /// Keeps a message that could not be stored, with why, so ingest can go on.
    pub async fn dead_letter(&self, topic: &str, payload: &[u8], reason: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO dead_letters (topic, payload, reason, at) VALUES ($1, $2, $3, $4)",
        )
        .bind(topic)
        .bind(payload)
        .bind(flotilla_proto::truncate_chars(reason, 500))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Dead letters, newest first: (topic, reason).
    pub async fn dead_letters(&self, limit: i64) -> StoreResult<Vec<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT topic, reason FROM dead_letters ORDER BY id DESC LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Sets (or, with an empty payload, clears) a retained message.
    pub async fn set_retained(&self, topic: &str, payload: &[u8], qos: u8) -> StoreResult<()> {
        if payload.is_empty() {
            sqlx::query("DELETE FROM retained WHERE topic = $1")
                .bind(topic)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "INSERT INTO retained (topic, payload, qos, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos, updated_at = excluded.updated_at",
            )
            .bind(topic)
            .bind(payload)
            .bind(i64::from(qos))
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    pub async fn retained(&self) -> StoreResult<Vec<RetainedRow>> {
        let rows: Vec<(String, Vec<u8>, i64)> =
            sqlx::query_as("SELECT topic, payload, qos FROM retained ORDER BY topic")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(topic, payload, qos)| RetainedRow {
                topic,
                payload,
                qos: u8::try_from(qos.clamp(0, 2)).unwrap_or(1),
            })
            .collect())
    }
}
