use flotilla_proto::DeviceId;
use flotilla_proto::{Heartbeat, Status, Telemetry};
use serde::Serialize;
use sqlx::{Any, Row, Transaction};

use super::params::{Params, ROWS_PER_STATEMENT};
use super::{Store, StoreError, StoreResult, now_ms};

/// A device as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRow {
    pub device_id: DeviceId,
    pub name: String,
    pub owner_id: i64,
    pub blocked: bool,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub disconnect_reason: Option<String>,
    pub firmware_version: Option<String>,
    pub hardware: Option<String>,
    /// Operator-assigned labels, for rollout targets.
    pub tags: Vec<String>,
    pub led: Option<String>,
    pub brightness: Option<i64>,
    pub heap: Option<i64>,
    pub rssi: Option<i64>,
    /// Seconds since the device booted, as of its last heartbeat.
    pub uptime: Option<i64>,
    pub crashes: Option<i64>,
    pub provisioned: bool,
    pub created_at: i64,
}

/// What the broker's gate needs to know of a device at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateEntry {
    pub device_id: String,
    pub blocked: bool,
    /// The serial of its current certificate.
    pub serial: Option<String>,
    /// The serial of a certificate issued by renewal and not used yet; valid too.
    pub pending_serial: Option<String>,
}

const GATE_COLUMNS: &str =
    "SELECT device_id, blocked, cert_serial, cert_pending_serial FROM devices";

fn gate_entry_from(r: &sqlx::any::AnyRow) -> StoreResult<GateEntry> {
    Ok(GateEntry {
        device_id: r.try_get("device_id")?,
        blocked: r.try_get::<i64, _>("blocked")? != 0,
        serial: r.try_get("cert_serial")?,
        pending_serial: r.try_get("cert_pending_serial")?,
    })
}

fn device_from(row: &sqlx::any::AnyRow) -> StoreResult<DeviceRow> {
    let cert_serial: Option<String> = row.try_get("cert_serial")?;
    let device_id: String = row.try_get("device_id")?;
    Ok(DeviceRow {
        device_id: crate::parse_device_id(&device_id)?,
        name: row.try_get("name")?,
        owner_id: row.try_get("owner_id")?,
        blocked: row.try_get::<i64, _>("blocked")? != 0,
        online: row.try_get::<i64, _>("online")? != 0,
        last_seen: row.try_get("last_seen")?,
        disconnect_reason: row.try_get("disconnect_reason")?,
        firmware_version: row.try_get("fw_version")?,
        hardware: row.try_get("hardware")?,
        // Rows of their own (device_tags), filled in by the caller.
        tags: Vec::new(),
        led: row.try_get("led_state")?,
        brightness: row.try_get("led_brightness")?,
        heap: row.try_get("heap")?,
        rssi: row.try_get("rssi")?,
        uptime: row.try_get("uptime")?,
        crashes: row.try_get("crashes")?,
        provisioned: cert_serial.is_some(),
        created_at: row.try_get("created_at")?,
    })
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryRow {
    pub seq: i64,
    pub device_ts: Option<i64>,
    pub received_at: i64,
    pub pot: Option<i64>,
    pub switch: Option<bool>,
    pub temp: Option<f64>,
}

/// A change to a device's live state, decoded from one device message.
#[derive(Debug, Clone)]
pub enum DeviceUpdate {
    Heartbeat(Heartbeat),
    Status(Status),
    Telemetry(Telemetry),
}

impl Store {
    /// Registers a device to `owner`. Ok(false) if it exists and belongs to someone else.
    pub async fn register_device(
        &self,
        device_id: &DeviceId,
        name: &str,
        owner: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let ok = register_in(&mut tx, device_id.as_str(), name, owner).await?;
        tx.commit().await?;
        Ok(ok)
    }

    pub async fn device(&self, device_id: &DeviceId) -> StoreResult<Option<DeviceRow>> {
        let mut tx = self.begin_read().await?;
        let row = sqlx::query("SELECT * FROM devices WHERE device_id = $1")
            .bind(device_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(mut device) = row.as_ref().map(device_from).transpose()? else {
            return Ok(None);
        };
        device.tags =
            sqlx::query_scalar("SELECT tag FROM device_tags WHERE device_id = $1 ORDER BY tag")
                .bind(device_id.as_str())
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Some(device))
    }

    /// The device if `owner` may see it (None for admins means any owner).
    pub async fn device_visible_to(
        &self,
        device_id: &DeviceId,
        owner: Option<i64>,
    ) -> StoreResult<Option<DeviceRow>> {
        Ok(self
            .device(device_id)
            .await?
            .filter(|d| owner.is_none_or(|o| d.owner_id == o)))
    }

    pub async fn devices_of(&self, owner: Option<i64>) -> StoreResult<Vec<DeviceRow>> {
        let mut tx = self.begin_read().await?;
        // One transaction, so the tags read belong to the devices read.
        let rows = sqlx::query(
            "SELECT * FROM devices WHERE $1 IS NULL OR owner_id = $1 ORDER BY device_id",
        )
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?;
        let tags: Vec<(String, String)> = sqlx::query_as(
            "SELECT t.device_id, t.tag FROM device_tags t JOIN devices d ON d.device_id = t.device_id \
             WHERE $1 IS NULL OR d.owner_id = $1 ORDER BY t.device_id, t.tag",
        )
        .bind(owner)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_device = super::grouped(tags);
        rows.iter()
            .map(|r| {
                let mut d = device_from(r)?;
                d.tags = by_device.remove(d.device_id.as_str()).unwrap_or_default();
                Ok(d)
            })
            .collect()
    }

    /// Replaces a device's tags.
    pub async fn set_device_tags(&self, device_id: &DeviceId, tags: &[String]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // Two replacements at once: one after the other, never their union.
        lock_device(&mut tx, device_id.as_str()).await?;
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
            .bind(device_id.as_str())
            .execute(&mut *tx)
            .await?;
        for chunk in tags.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO device_tags (device_id, tag) VALUES {} ON CONFLICT DO NOTHING",
                Params::for_connection(&tx).rows(chunk.len(), 2)
            );
            let mut q = sqlx::query(&sql);
            for tag in chunk {
                q = q.bind(device_id.as_str()).bind(tag.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        Ok(tx.commit().await?)
    }

    /// Blocks an unblocked device and unblocks a blocked one; whether it is blocked now.
    /// [`StoreError::NotFound`](crate::StoreError::NotFound) when there is no such device.
    pub async fn toggle_device_block(&self, device_id: &DeviceId) -> StoreResult<bool> {
        let blocked: Option<i64> = sqlx::query_scalar(
            "UPDATE devices SET blocked = 1 - blocked WHERE device_id = $1 RETURNING blocked",
        )
        .bind(device_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        blocked.map(|b| b != 0).ok_or(crate::StoreError::NotFound)
    }

    /// Ids of blocked devices and the current certificate serial of every device, for the broker gate.
    /// One device's [`GateEntry`]; `None` if there is no such device.
    pub async fn gate_entry(&self, device_id: &DeviceId) -> StoreResult<Option<GateEntry>> {
        let sql = format!("{GATE_COLUMNS} WHERE device_id = $1");
        let row = sqlx::query(&sql)
            .bind(device_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(gate_entry_from).transpose()
    }

    pub async fn gate_snapshot(&self) -> StoreResult<Vec<GateEntry>> {
        let rows = sqlx::query(GATE_COLUMNS).fetch_all(&self.pool).await?;
        rows.iter().map(gate_entry_from).collect()
    }

    pub async fn mark_offline(&self, device_id: &DeviceId, reason: &str) -> StoreResult<bool> {
        // Stamped as a presence change (forward only), and presence goes by receive time until
        // the device's next message: one received before this, committed after it, does not
        // bring the device back online, whatever its key.
        let r = sqlx::query("UPDATE devices SET online = 0, disconnect_reason = $1, \
             presence_at = CASE WHEN presence_at IS NULL OR presence_at < $3 THEN $3 ELSE presence_at END, \
             presence_ord = NULL \
             WHERE device_id = $2 AND online = 1")
            .bind(reason)
            .bind(device_id.as_str())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks devices whose last message is older than `cutoff` offline; returns their ids.
    /// Looks first with a read (indexed), so a sweep with nothing to do never takes the
    /// write lock ingest needs.
    pub async fn expire_silent_devices(&self, cutoff: i64) -> StoreResult<Vec<String>> {
        let mut conn = self.pool.acquire().await?;
        expire_silent_devices_in(&mut conn, cutoff).await
    }

    pub async fn telemetry(
        &self,
        device_id: &DeviceId,
        limit: i64,
    ) -> StoreResult<Vec<TelemetryRow>> {
        let rows =
            sqlx::query("SELECT * FROM telemetry WHERE device_id = $1 ORDER BY seq DESC LIMIT $2")
                .bind(device_id.as_str())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(TelemetryRow {
                    seq: r.try_get("seq")?,
                    device_ts: r.try_get("device_ts")?,
                    received_at: r.try_get("received_at")?,
                    pot: r.try_get("pot")?,
                    switch: r.try_get::<Option<i64>, _>("switch")?.map(|v| v != 0),
                    temp: r.try_get("temp")?,
                })
            })
            .collect()
    }
}

pub(super) async fn expire_silent_devices_in(
    conn: &mut sqlx::AnyConnection,
    cutoff: i64,
) -> StoreResult<Vec<String>> {
    let due: Option<i64> = sqlx::query_scalar(SILENT_DEVICE_EXISTS)
        .bind(cutoff)
        .fetch_optional(&mut *conn)
        .await?;
    if due.is_none() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        // Stamped at the cutoff (forward only), by receive time (see mark_offline): a message
        // received before it and committed after the sweep does not bring the device back.
        "UPDATE devices SET online = 0, disconnect_reason = 'heartbeat timeout', \
         presence_at = CASE WHEN presence_at IS NULL OR presence_at < $1 THEN $1 ELSE presence_at END, \
         presence_ord = NULL \
         WHERE online = 1 AND (last_seen IS NULL OR last_seen < $1) RETURNING device_id",
    )
    .bind(cutoff)
    .fetch_all(&mut *conn)
    .await?)
}

pub(super) async fn register_in(
    tx: &mut Transaction<'_, Any>,
    device_id: &str,
    name: &str,
    owner: i64,
) -> StoreResult<bool> {
    // Insert-if-absent, then read who owns it: two registrations of one new id at once end
    // with one owner and a clear answer for the other, on either engine.
    sqlx::query(
        "INSERT INTO devices (device_id, owner_id, name, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (device_id) DO NOTHING",
    )
    .bind(device_id)
    .bind(owner)
    .bind(name)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    let existing: i64 = sqlx::query_scalar("SELECT owner_id FROM devices WHERE device_id = $1")
        .bind(device_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(existing == owner)
}

/// `FOR UPDATE` on PostgreSQL, nothing on SQLite: reads of a device row that a later write
/// in the same transaction depends on lock it there, so a concurrent change (a block, another
/// offer, other tags) waits instead of being overwritten. SQLite's one writer already
/// serialises them.
pub(super) fn for_update(conn: &sqlx::AnyConnection) -> &'static str {
    if conn.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME {
        " FOR UPDATE"
    } else {
        ""
    }
}

/// Locks a device's row until the transaction ends (PostgreSQL; see [`for_update`]).
pub(super) async fn lock_device(tx: &mut Transaction<'_, Any>, device_id: &str) -> StoreResult<()> {
    let lock = for_update(tx);
    if !lock.is_empty() {
        sqlx::query(&format!("SELECT 1 FROM devices WHERE device_id = $1{lock}"))
            .bind(device_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Whether a row's field `group` (`presence`, `health`, `status`, `fw`; columns `{group}_at`
/// and `{group}_ord`, after `prefix`) may take a message received at `at` with the order key
/// `ord` ([`flotilla_proto::order_key`]; `NULL` for a device that does not number its
/// messages). Messages of one device can be taken by two replicas, or late (a backlog drained
/// after a crash), and committed in any order; each group keeps the key of the message that
/// last set it and the latest receive time of those that did, and an older message leaves it
/// as it is. Older means a lower key when both have one (equal keys: received earlier), else
/// received earlier (`NULL`: never set); equal times apply in commit order (one replica's
/// messages commit in arrival order). The firmware version, reported by heartbeats and status
/// alike, is a group of its own.
///
/// A key loses its say once its group has taken nothing for [`KEY_HORIZON_MS`]: a device
/// whose keys went back (its counter restored from an old backup, a board provisioned again
/// under an id while the old one's messages were still in flight) is heard again within that
/// time instead of never; a message taken that late applies by receive time.
fn newer(prefix: &str, group: &str, at: &str, ord: &str) -> String {
    let (g_at, g_ord) = (
        format!("{prefix}{group}_at"),
        format!("{prefix}{group}_ord"),
    );
    format!(
        "(CASE WHEN {ord} IS NOT NULL AND {g_ord} IS NOT NULL AND {g_at} >= {at} - {KEY_HORIZON_MS} \
         THEN {g_ord} < {ord} OR ({g_ord} = {ord} AND {g_at} <= {at}) \
         ELSE ({g_at} IS NULL OR {g_at} <= {at}) END)"
    )
}

/// How long a group's order key outranks later-received messages with lower keys (see
/// [`newer`]): far longer than a device's heartbeat interval, so a group in use is judged by
/// key; short enough that a device whose keys went back is not shut out for long.
pub const KEY_HORIZON_MS: i64 = 10 * 60 * 1000;

/// What a message that passes [`newer`] writes to `group`'s columns: its key (`NULL` when it
/// has none: the group then goes by receive time), and its receive time if it is the latest.
fn stamp(guard: &str, group: &str, at: &str, ord: &str) -> String {
    let g_at = format!("{group}_at");
    format!(
        "{}, {}",
        set_if(
            &format!("{guard} AND ({g_at} IS NULL OR {g_at} < {at})"),
            &g_at,
            at
        ),
        set_if(guard, &format!("{group}_ord"), ord)
    )
}

/// `column = value` when `guard` holds, else unchanged.
fn set_if(guard: &str, column: &str, value: &str) -> String {
    format!("{column} = CASE WHEN {guard} THEN {value} ELSE {column} END")
}

/// The presence columns a message received at `at` with key `ord` sets: online (`online`, 1
/// or 0) with its reason when it is newer than the presence on record, and `last_seen` moved
/// forward when it came from the device (online).
fn presence_sets(at: &str, ord: &str, online: &str, reason: &str) -> String {
    let p = newer("", "presence", at, ord);
    [
        set_if(&p, "online", online),
        set_if(&p, "disconnect_reason", reason),
        stamp(&p, "presence", at, ord),
        set_if(
            &format!("{online} = 1 AND (last_seen IS NULL OR last_seen < {at})"),
            "last_seen",
            at,
        ),
    ]
    .join(", ")
}

/// [`newer`] on values read: whether a group last set by a message received at `set_at` with
/// key `set_ord` takes one received at `at` with key `ord`.
fn is_newer(set_at: Option<i64>, set_ord: Option<i64>, at: i64, ord: Option<i64>) -> bool {
    match (set_ord, ord, set_at) {
        (Some(set), Some(ord), Some(set_at)) if set_at >= at - KEY_HORIZON_MS => {
            set < ord || (set == ord && set_at <= at)
        }
        _ => set_at.is_none_or(|s| s <= at),
    }
}

/// A message's order key as stored (ingest refuses one above `i64::MAX`, which no device
/// sends: see [`flotilla_proto::order_key`]).
fn ord_of(ord: Option<u64>) -> Option<i64> {
    ord.and_then(|o| i64::try_from(o).ok())
}

/// [`presence_sets`] for a message bound as `$1` (received), `$2` (online), `$3` (reason), and
/// its key as `ord`.
fn presence_sets_bound(ord: &str) -> String {
    presence_sets("$1", ord, "$2", "CASE WHEN $2 = 1 THEN NULL ELSE $3 END")
}

type Sql = std::sync::LazyLock<String>;

/// A heartbeat: `$1` received, `$2` 1, `$3` no reason, `$4` version, `$5` heap, `$6` RSSI,
/// `$7` uptime, `$8` crashes, `$9` the device, `$10` its key. Built once: ingest runs it per
/// message.
static HEARTBEAT_UPDATE: Sql = Sql::new(|| {
    let h = newer("", "health", "$1", "$10");
    let f = newer("", "fw", "$1", "$10");
    format!(
        "UPDATE devices SET {}, {}, {}, {}, {}, {}, {}, {} WHERE device_id = $9",
        presence_sets_bound("$10"),
        set_if(&f, "fw_version", "$4"),
        stamp(&f, "fw", "$1", "$10"),
        set_if(&h, "heap", "$5"),
        set_if(&h, "rssi", "COALESCE($6, rssi)"),
        set_if(&h, "uptime", "$7"),
        set_if(&h, "crashes", "COALESCE($8, crashes)"),
        stamp(&h, "health", "$1", "$10"),
    )
});

/// A status: `$1` received, `$2` online, `$3` reason, `$4` LED, `$5` brightness, `$6`
/// version, `$7` hardware, `$8` reported config, `$9` whether it reports the device's own
/// fields (1) or is a will (0), `$10` the device, `$11` its key.
static STATUS_UPDATE: Sql = Sql::new(|| {
    let s = format!("($9 = 1 AND {})", newer("", "status", "$1", "$11"));
    // The version is also in heartbeats: it is a group of its own.
    let f = format!("($6 IS NOT NULL AND {})", newer("", "fw", "$1", "$11"));
    format!(
        "UPDATE devices SET {}, {}, {}, {}, {}, {}, {}, {}, {} WHERE device_id = $10",
        presence_sets_bound("$11"),
        set_if(&s, "led_state", "COALESCE($4, led_state)"),
        set_if(&s, "led_brightness", "COALESCE($5, led_brightness)"),
        set_if(&f, "fw_version", "$6"),
        stamp(&f, "fw", "$1", "$11"),
        set_if(&s, "hardware", "COALESCE($7, hardware)"),
        set_if(&s, "reported_config", "COALESCE($8, reported_config)"),
        set_if(
            &format!("{s} AND $8 IS NOT NULL"),
            "reported_config_at",
            "$1"
        ),
        stamp(&s, "status", "$1", "$11"),
    )
});

/// One reading's presence: `$1` received, `$2` 1, `$3` no reason, `$4` the device, `$5` its
/// key.
static READING_PRESENCE_UPDATE: Sql = Sql::new(|| {
    format!(
        "UPDATE devices SET {} WHERE device_id = $4",
        presence_sets_bound("$5")
    )
});

/// Applies one device message, received at `received` (ms), inside the ingest transaction;
/// each field group changes only if the message is newer than the one that last set it (see
/// [`newer`]). Returns true when the message brought the device from offline to online.
pub(super) async fn apply_update(
    tx: &mut Transaction<'_, Any>,
    device_id: &str,
    update: &DeviceUpdate,
    received: i64,
) -> StoreResult<bool> {
    // A blocked device's messages change nothing, even those taken before the block and
    // committed after it; the row stays locked until commit, so a block waits for this
    // transaction or this one sees it.
    let select = format!(
        "SELECT online, presence_at, presence_ord FROM devices WHERE device_id = $1 AND blocked = 0{}",
        for_update(tx)
    );
    let row: Option<(i64, Option<i64>, Option<i64>)> = sqlx::query_as(&select)
        .bind(device_id)
        .fetch_optional(&mut **tx)
        .await?;
    let Some((was_online, presence_at, presence_ord)) = row else {
        return Ok(false);
    };
    let ord = ord_of(match update {
        DeviceUpdate::Heartbeat(hb) => hb.ord,
        DeviceUpdate::Status(st) => st.ord,
        DeviceUpdate::Telemetry(t) => t.ord,
    });
    let presence_newer = is_newer(presence_at, presence_ord, received, ord);
    let mut online_now = true;
    match update {
        DeviceUpdate::Heartbeat(hb) => {
            sqlx::query(HEARTBEAT_UPDATE.as_str())
                .bind(received)
                .bind(1_i64)
                .bind(None::<&str>)
                .bind(&hb.fw)
                .bind(i64::from(hb.heap))
                .bind(hb.rssi.map(i64::from))
                .bind(hb.uptime.map(|u| u.min(i64::MAX as u64) as i64))
                .bind(hb.crashes.map(i64::from))
                .bind(device_id)
                .bind(ord)
                .execute(&mut **tx)
                .await?;
        }
        DeviceUpdate::Status(st) => {
            online_now = st.online;
            // A will ("offline", from the broker) reports nothing of the device's own, so it
            // leaves the reported fields and their time to the device's last status.
            let reports = st.led.is_some()
                || st.brightness.is_some()
                || st.fw.is_some()
                || st.hw.is_some()
                || st.config.is_some();
            sqlx::query(STATUS_UPDATE.as_str())
                .bind(received)
                .bind(i64::from(st.online))
                .bind(st.reason.as_deref().unwrap_or("offline"))
                .bind(st.led.map(|l| l.as_str()))
                .bind(st.brightness.map(i64::from))
                .bind(st.fw.as_deref())
                .bind(
                    st.hw
                        .as_deref()
                        .map(|h| flotilla_proto::truncate_chars(h, 32)),
                )
                .bind(
                    st.config
                        .as_ref()
                        .map(|c| serde_json::to_string(c).unwrap_or_default()),
                )
                .bind(i64::from(reports))
                .bind(device_id)
                .bind(ord)
                .execute(&mut **tx)
                .await?;
        }
        DeviceUpdate::Telemetry(t) => {
            // (device, seq) is the primary key: a redelivered reading is ignored, not duplicated.
            sqlx::query(
                "INSERT INTO telemetry (device_id, seq, device_ts, received_at, pot, switch, temp) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(device_id)
            .bind(t.seq as i64)
            .bind(t.ts.map(|v| v as i64))
            .bind(received)
            .bind(t.pot.map(i64::from))
            .bind(t.switch.map(i64::from))
            .bind(t.temp.map(f32_to_f64_shortest))
            .execute(&mut **tx)
            .await?;
            sqlx::query(READING_PRESENCE_UPDATE.as_str())
                .bind(received)
                .bind(1_i64)
                .bind(None::<&str>)
                .bind(device_id)
                .bind(ord)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(was_online == 0 && online_now && presence_newer)
}

/// Whether an online device has been silent since the cutoff.
pub(super) const SILENT_DEVICE_EXISTS: &str = "SELECT 1 FROM devices WHERE online = 1 AND last_seen < $1 \
     UNION ALL SELECT 1 FROM devices WHERE online = 1 AND last_seen IS NULL LIMIT 1";

/// A telemetry reading of a device, received at the time given (ms).
pub(super) type Reading<'a> = (&'a str, &'a Telemetry, i64);

/// Stores a run of telemetry readings in a few statements, whatever their number: on SQLite
/// one SELECT for the devices' presence, multi-row INSERTs, one UPDATE (each statement is a
/// round trip to the database's worker thread, so this costs the same as [`apply_update`]
/// does for a single reading); on PostgreSQL one statement ([`PG_APPLY_READINGS`]). Each
/// reading is stored as [`apply_update`] would; a device's presence is judged once, by the
/// batch's latest receive time and highest key for it (the same as one at a time when its
/// readings all have keys or none do, as one device's do). Returns the devices that came
/// online, each once.
pub(super) async fn apply_readings(
    tx: &mut Transaction<'_, Any>,
    readings: &[Reading<'_>],
) -> StoreResult<Vec<String>> {
    if tx.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME {
        return apply_readings_pg(tx, readings).await;
    }
    // Each device's presence moves to its latest reading's receive time, as it would one
    // reading at a time.
    let mut latest: std::collections::BTreeMap<&str, (i64, Option<i64>)> =
        std::collections::BTreeMap::new();
    for (device, t, received) in readings {
        let ord = ord_of(t.ord);
        let (at, max_ord) = latest.entry(*device).or_insert((*received, ord));
        *at = (*at).max(*received);
        *max_ord = (*max_ord).max(ord);
    }
    let devices: Vec<&str> = latest.keys().copied().collect();
    let mut known = std::collections::HashSet::new();
    let mut came_online = Vec::new();
    for chunk in devices.chunks(ROWS_PER_STATEMENT) {
        // SQLite: the transaction holds the write lock (no row locks to order).
        let sql = format!(
            "SELECT device_id, online, presence_at, presence_ord FROM devices \
             WHERE blocked = 0 AND device_id IN ({}) ORDER BY device_id",
            Params::for_connection(tx).list(chunk.len()),
        );
        let mut q = sqlx::query_as::<_, (String, i64, Option<i64>, Option<i64>)>(&sql);
        for d in chunk {
            q = q.bind(*d);
        }
        for (id, online, presence_at, presence_ord) in q.fetch_all(&mut **tx).await? {
            let (at, ord) = latest[id.as_str()];
            if online == 0 && is_newer(presence_at, presence_ord, at, ord) {
                came_online.push(id.clone());
            }
            known.insert(id);
        }
    }
    // A reading for a device that is not registered, or is blocked, is dropped, as
    // apply_update does.
    let rows: Vec<&Reading> = readings
        .iter()
        .filter(|(d, _, _)| known.contains(*d))
        .collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        // (device, seq) is the primary key: a redelivered reading is ignored, not duplicated.
        let sql = format!(
            "INSERT INTO telemetry (device_id, seq, device_ts, received_at, pot, switch, temp) \
             VALUES {} ON CONFLICT DO NOTHING",
            Params::for_connection(tx).rows(chunk.len(), 7)
        );
        let mut q = sqlx::query(&sql);
        for (device, t, received) in chunk {
            q = q
                .bind(*device)
                .bind(t.seq as i64)
                .bind(t.ts.map(|v| v as i64))
                .bind(*received)
                .bind(t.pot.map(i64::from))
                .bind(t.switch.map(i64::from))
                .bind(t.temp.map(f32_to_f64_shortest));
        }
        q.execute(&mut **tx).await?;
    }
    let seen: Vec<(&str, (i64, Option<i64>))> = latest
        .into_iter()
        .filter(|(d, _)| known.contains(*d))
        .collect();
    for chunk in seen.chunks(ROWS_PER_STATEMENT) {
        // SQLite names a VALUES list's columns column1, column2, column3.
        let sql = format!(
            "UPDATE devices SET {} FROM (VALUES {}) AS v WHERE devices.device_id = v.column1",
            presence_sets("v.column2", "v.column3", "1", "NULL"),
            Params::for_connection(tx).rows(chunk.len(), 3)
        );
        let mut q = sqlx::query(&sql);
        for (d, (at, ord)) in chunk {
            q = q.bind(*d).bind(*at).bind(*ord);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(came_online)
}

/// [`apply_readings`] on PostgreSQL in one statement, whatever the number of readings: they
/// travel as one JSON parameter, so the SQL never changes (prepared once per connection) and
/// the batch is one statement besides its transaction's BEGIN and COMMIT. The devices are
/// locked in id order; of two readings with one `(device, seq)` the first is stored, as one
/// at a time (the ordinality keeps the batch's order). A batch still locks devices in message
/// order across its statements, so two writers' batches, or a batch and the presence sweep,
/// can deadlock; the loser retries (40P01 is "unavailable" to ingest).
static PG_APPLY_READINGS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH r AS (SELECT * FROM ROWS FROM (json_to_recordset($1::json) \
             AS (d text, s bigint, ts bigint, pot bigint, sw bigint, temp text, at bigint, o bigint)) \
             WITH ORDINALITY AS r(d, s, ts, pot, sw, temp, at, o, n)), \
         locked AS (SELECT device_id, online, presence_at, presence_ord FROM devices WHERE blocked = 0 \
             AND device_id IN (SELECT d FROM r) ORDER BY device_id FOR UPDATE), \
         latest AS (SELECT r.d, MAX(r.at) AS at, MAX(r.o) AS o FROM r \
             JOIN locked ON locked.device_id = r.d GROUP BY r.d), \
         stored AS (INSERT INTO telemetry (device_id, seq, device_ts, received_at, pot, switch, temp) \
             SELECT DISTINCT ON (r.d, r.s) r.d, r.s, r.ts, r.at, r.pot, r.sw, CAST(r.temp AS float8) \
             FROM r JOIN locked ON locked.device_id = r.d ORDER BY r.d, r.s, r.n \
             ON CONFLICT DO NOTHING), \
         seen AS (UPDATE devices SET {} FROM latest WHERE devices.device_id = latest.d) \
         SELECT locked.device_id FROM locked JOIN latest ON latest.d = locked.device_id \
         WHERE locked.online = 0 AND {} ORDER BY locked.device_id",
        presence_sets("latest.at", "latest.o", "1", "NULL"),
        newer("locked.", "presence", "latest.at", "latest.o"),
    )
});

/// One reading as [`PG_APPLY_READINGS`] reads it.
#[derive(serde::Serialize)]
struct ReadingRow<'a> {
    d: &'a str,
    s: i64,
    ts: Option<i64>,
    pot: Option<i64>,
    sw: Option<i64>,
    /// As text, the shortest decimal form: what [`f32_to_f64_shortest`] stores.
    temp: Option<String>,
    /// When it was received.
    at: i64,
    /// Its order key.
    o: Option<i64>,
}

async fn apply_readings_pg(
    tx: &mut Transaction<'_, Any>,
    readings: &[Reading<'_>],
) -> StoreResult<Vec<String>> {
    let rows: Vec<ReadingRow> = readings
        .iter()
        .map(|(device, t, received)| ReadingRow {
            d: device,
            s: t.seq as i64,
            ts: t.ts.map(|v| v as i64),
            pot: t.pot.map(i64::from),
            sw: t.switch.map(i64::from),
            temp: t.temp.map(|v| v.to_string()),
            at: *received,
            o: ord_of(t.ord),
        })
        .collect();
    let rows =
        serde_json::to_string(&rows).map_err(|e| StoreError::Refused(e.to_string().into()))?;
    Ok(sqlx::query_scalar(PG_APPLY_READINGS.as_str())
        .bind(rows)
        .fetch_all(&mut **tx)
        .await?)
}

/// Widens an f32 through its shortest decimal form, so 18.7f32 is stored as 18.7, not
/// 18.700000762939453.
fn f32_to_f64_shortest(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}
