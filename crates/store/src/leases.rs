//! Leases: which replica runs a piece of background work. A holder renews its lease well
//! within its time to live; when it stops (killed, cut off from the database), another takes
//! it once it lapsed, under a higher epoch. Work done under a lease checks, in its own
//! transaction, that the lease is still held under the epoch it started with
//! ([`Store::begin_fenced`]): that check locks the lease row until the work commits, so a new
//! holder's takeover waits for it, and work of an old holder that lost the lease is refused
//! instead of interleaving with the new holder's.
//!
//! Every expiry is set and compared on the database's clock, never a replica's: replicas run
//! on several machines whose clocks differ, and one whose clock ran ahead by more than a time
//! to live would take every live lease, one running behind would wait that much longer for a
//! dead holder's.

use sqlx::{Any, Transaction};

use super::{Backend, Store, StoreResult};

/// The database's clock in Unix ms, as SQL. `clock_timestamp()`, not `now()`: PostgreSQL's
/// `now()` stays at the transaction's start, and a fenced transaction checks the lease late.
fn clock_ms(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// A lease as held now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub epoch: i64,
    /// Unix ms.
    pub expires_at: i64,
}

impl Store {
    /// Takes or renews the lease `name` for `holder` for `ttl_ms`. `None` while another holder
    /// has it and it has not lapsed. The epoch stays while one holder renews in time, and
    /// grows whenever the lease is taken after it lapsed or from another holder.
    pub async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> StoreResult<Option<Held>> {
        let sql = format!(
            "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, $2, 1, {now} + $3) \
             ON CONFLICT (name) DO UPDATE SET \
             epoch = CASE WHEN leases.holder = $4 AND leases.expires_at > {now} THEN leases.epoch \
                 ELSE leases.epoch + 1 END, \
             holder = $5, expires_at = excluded.expires_at \
             WHERE leases.holder = $6 OR leases.expires_at <= {now} \
             RETURNING epoch, expires_at",
            now = clock_ms(self.backend)
        );
        let held: Option<(i64, i64)> = sqlx::query_as(&sql)
            .bind(name)
            .bind(holder)
            .bind(ttl_ms)
            .bind(holder)
            .bind(holder)
            .bind(holder)
            .fetch_optional(&self.pool)
            .await?;
        Ok(held.map(|(epoch, expires_at)| Held { epoch, expires_at }))
    }

    /// Gives the lease up at once (a clean shutdown), so another holder need not wait for it
    /// to lapse.
    /// Who holds the lease `name`, and until when on the database's clock (ms); `None` if it
    /// was never taken.
    pub async fn lease(&self, name: &str) -> StoreResult<Option<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT holder, expires_at FROM leases WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes the lease `name` for `holder` only if it exists and has lapsed (under a higher
    /// epoch); `None` otherwise. Unlike [`Store::hold_lease`] it never creates one.
    pub async fn take_lapsed_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> StoreResult<Option<Held>> {
        let sql = format!(
            "UPDATE leases SET holder = $1, epoch = epoch + 1, expires_at = {now} + $2 \
             WHERE name = $3 AND expires_at <= {now} RETURNING epoch, expires_at",
            now = clock_ms(self.backend)
        );
        let held: Option<(i64, i64)> = sqlx::query_as(&sql)
            .bind(holder)
            .bind(ttl_ms)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(held.map(|(epoch, expires_at)| Held { epoch, expires_at }))
    }

    /// Names of the leases starting with `prefix` that lapsed at least `for_ms` ago (their
    /// holder stopped renewing, or gave them up), in name order.
    pub async fn lapsed_leases(&self, prefix: &str, for_ms: i64) -> StoreResult<Vec<String>> {
        let sql = format!(
            "SELECT name FROM leases WHERE substr(name, 1, length($1)) = $2 \
             AND expires_at <= {now} - $3 ORDER BY name",
            now = clock_ms(self.backend)
        );
        let names: Vec<String> = sqlx::query_scalar(&sql)
            .bind(prefix)
            .bind(prefix)
            .bind(for_ms)
            .fetch_all(&self.pool)
            .await?;
        Ok(names)
    }

    /// Removes the lease `name` if `holder` holds it: the work it guarded is over, and it is
    /// no longer anyone's to take over (the next to take it starts afresh at epoch 1).
    /// Whether it was removed.
    pub async fn end_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A transaction for work done under the lease: `None` (and nothing begun) unless
    /// `holder` still holds `name` under `epoch` and it has not lapsed. The lease row stays
    /// locked until the transaction ends.
    ///
    /// A holder that waits longer than `stall_limit` between two statements of the work
    /// (paused, frozen, starved) loses it: on PostgreSQL the server ends its session, which
    /// rolls the work back and frees the lease row, so a stalled holder cannot keep the next
    /// one from taking the lapsed lease. Keep it well under the lease's time to live. (One
    /// process owns a SQLite database: there is no other holder to keep waiting.)
    pub async fn begin_fenced(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        stall_limit: std::time::Duration,
    ) -> StoreResult<Option<FencedTx>> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            // SET takes no parameters; the value is a number formatted here.
            let ms = stall_limit.as_millis().clamp(1, i32::MAX as u128);
            sqlx::query(&format!(
                "SET LOCAL idle_in_transaction_session_timeout = {ms}"
            ))
            .execute(&mut *tx)
            .await?;
        }
        // A write to the row takes its lock on both engines (on SQLite, the database's).
        let sql = format!(
            "UPDATE leases SET epoch = epoch WHERE name = $1 AND holder = $2 AND epoch = $3 \
             AND expires_at > {now}",
            now = clock_ms(self.backend)
        );
        let held = sqlx::query(&sql)
            .bind(name)
            .bind(holder)
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
        if held.rows_affected() == 1 {
            Ok(Some(FencedTx(tx)))
        } else {
            tx.rollback().await?;
            Ok(None)
        }
    }
}

/// Background work under a lease, committed only together with the proof that the lease was
/// still held ([`Store::begin_fenced`]); dropped uncommitted, it changes nothing.
#[must_use = "nothing is changed until it is committed"]
pub struct FencedTx(Transaction<'static, Any>);

impl FencedTx {
    /// Expires open commands past their deadline; how many.
    pub async fn expire_commands(&mut self) -> StoreResult<u64> {
        super::commands::expire_commands_in(&mut self.0).await
    }

    /// Marks devices silent since `cutoff` offline; their ids.
    pub async fn expire_silent_devices(&mut self, cutoff: i64) -> StoreResult<Vec<String>> {
        super::devices::expire_silent_devices_in(&mut self.0, cutoff).await
    }

    /// Saves a rollout planner's decisions ([`Store::save_rollout`]).
    pub async fn save_rollout(
        &mut self,
        save: &super::RolloutSave<'_>,
    ) -> StoreResult<super::SavedOffers> {
        super::rollouts::save_rollout_in(&mut self.0, save).await
    }

    /// [`Store::delete_expired`] under the lease.
    pub async fn delete_expired(
        &mut self,
        kind: super::RetentionKind,
        before_ms: i64,
        batch: i64,
    ) -> StoreResult<u64> {
        super::retention::delete_expired_in(&mut self.0, kind, before_ms, batch).await
    }

    /// [`Store::trim_device_telemetry`] under the lease.
    pub async fn trim_device_telemetry(
        &mut self,
        device: &flotilla_proto::DeviceId,
        keep: u64,
        batch: i64,
    ) -> StoreResult<u64> {
        super::retention::trim_device_telemetry_in(&mut self.0, device, keep, batch).await
    }

    /// [`Store::add_audit_checkpoint`] under the lease.
    pub async fn add_audit_checkpoint(
        &mut self,
        checkpoint: &flotilla_audit::Checkpoint,
    ) -> StoreResult<u64> {
        super::audit::add_audit_checkpoint_in(&mut self.0, checkpoint).await
    }

    pub async fn commit(self) -> StoreResult<()> {
        Ok(self.0.commit().await?)
    }
}
