//! Leases: which replica runs a piece of background work. A holder renews its lease well
//! within its time to live; when it stops (killed, cut off from the database), another takes
//! it once it lapsed, under a higher epoch. Work done under a lease checks, in its own
//! transaction, that the lease is still held under the epoch it started with
//! ([`Store::begin_fenced`]): that check locks the lease row until the work commits, so a new
//! holder's takeover waits for it, and work of an old holder that lost the lease is refused
//! instead of interleaving with the new holder's.

use sqlx::{Any, Transaction};

use super::{Store, StoreResult, now_ms};

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
        let now = now_ms();
        let expires_at = now + ttl_ms;
        let epoch: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, $2, 1, $3) \
             ON CONFLICT (name) DO UPDATE SET \
             epoch = CASE WHEN leases.holder = $4 AND leases.expires_at > $5 THEN leases.epoch \
                 ELSE leases.epoch + 1 END, \
             holder = $6, expires_at = $7 \
             WHERE leases.holder = $8 OR leases.expires_at <= $9 \
             RETURNING epoch",
        )
        .bind(name)
        .bind(holder)
        .bind(expires_at)
        .bind(holder)
        .bind(now)
        .bind(holder)
        .bind(expires_at)
        .bind(holder)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(epoch.map(|epoch| Held { epoch, expires_at }))
    }

    /// Gives the lease up at once (a clean shutdown), so another holder need not wait for it
    /// to lapse.
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
        let now = now_ms();
        let expires_at = now + ttl_ms;
        let epoch: Option<i64> = sqlx::query_scalar(
            "UPDATE leases SET holder = $1, epoch = epoch + 1, expires_at = $2 \
             WHERE name = $3 AND expires_at <= $4 RETURNING epoch",
        )
        .bind(holder)
        .bind(expires_at)
        .bind(name)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(epoch.map(|epoch| Held { epoch, expires_at }))
    }

    /// Names of the leases starting with `prefix` that lapsed at least `for_ms` ago (their
    /// holder stopped renewing, or gave them up), in name order.
    pub async fn lapsed_leases(&self, prefix: &str, for_ms: i64) -> StoreResult<Vec<String>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM leases WHERE substr(name, 1, length($1)) = $2 \
             AND expires_at <= $3 ORDER BY name",
        )
        .bind(prefix)
        .bind(prefix)
        .bind(now_ms().saturating_sub(for_ms))
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
    pub async fn begin_fenced(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> StoreResult<Option<FencedTx>> {
        let mut tx = self.pool.begin().await?;
        // A write to the row takes its lock on both engines (on SQLite, the database's).
        let held = sqlx::query(
            "UPDATE leases SET epoch = epoch WHERE name = $1 AND holder = $2 AND epoch = $3 \
             AND expires_at > $4",
        )
        .bind(name)
        .bind(holder)
        .bind(epoch)
        .bind(now_ms())
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

    pub async fn commit(self) -> StoreResult<()> {
        Ok(self.0.commit().await?)
    }
}
