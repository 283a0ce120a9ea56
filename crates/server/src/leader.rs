//! Which server runs the background work: the sweeps (command expiry, presence timeouts) and
//! the rollout planners ([`crate::rollouts`]). On PostgreSQL,
//! where replicas share the database, one of them holds the `background` lease
//! ([`flotilla_store::Store::hold_lease`]), renews it every third of its time to live, and
//! runs each sweep in a transaction fenced by the lease's epoch, so a replica that lost the
//! lease (paused, cut off) cannot write after another took it. On SQLite one process owns the
//! database and always leads.

use std::time::Duration;

use flotilla_store::{FencedTx, Store};
use tokio::sync::watch;

pub const LEASE: &str = "background";
/// How long a lease outlives its holder's last renewal.
pub const TTL: Duration = Duration::from_secs(10);
/// How long a sweep may sit idle inside its transaction before the database ends it
/// ([`Store::begin_fenced`]): under the TTL, so a leader frozen mid-sweep has let go of the
/// lease row by the time its lease lapses.
pub const STALL_LIMIT: Duration = Duration::from_secs(4);

#[derive(Debug, Clone)]
pub struct Leadership {
    /// `None` on SQLite: always the leader, nothing to fence.
    shared: Option<Shared>,
}

#[derive(Debug, Clone)]
struct Shared {
    holder: String,
    /// The epoch this server holds the lease under, while it does.
    epoch: watch::Receiver<Option<i64>>,
    /// The task renewing the lease, stopped before a release.
    renewal: std::sync::Arc<tokio::task::AbortHandle>,
}

/// What a sweep may write through.
pub enum Sweep<'a> {
    /// The only server on its database.
    Alone(&'a Store),
    /// Under the lease, committed only while it is held.
    Fenced(FencedTx),
}

fn ttl_ms() -> i64 {
    i64::try_from(TTL.as_millis()).unwrap_or(i64::MAX)
}

impl Leadership {
    pub fn alone() -> Leadership {
        Leadership { shared: None }
    }

    /// Competes for the lease as `holder` (unique per process: the replica id and a random
    /// suffix) and keeps renewing it.
    pub fn compete(store: Store, holder: String) -> Leadership {
        let (tx, epoch) = watch::channel(None);
        let (renewing, me) = (store, holder.clone());
        let renewal = tokio::spawn(async move {
            let mut tick = tokio::time::interval(TTL / 3);
            loop {
                tick.tick().await;
                let held = match renewing.hold_lease(LEASE, &me, ttl_ms()).await {
                    Ok(held) => held.map(|h| h.epoch),
                    Err(e) => {
                        // Unsure whether it still holds: it stops leading; the fence refuses
                        // its work either way once the lease lapsed.
                        tracing::warn!(error = %e, "renewing the background lease failed");
                        None
                    }
                };
                if *tx.borrow() != held {
                    tracing::info!(holder = %me, epoch = ?held, "background lease changed");
                }
                tx.send_replace(held);
            }
        });
        Leadership {
            shared: Some(Shared {
                holder,
                epoch,
                renewal: std::sync::Arc::new(renewal.abort_handle()),
            }),
        }
    }

    /// A clean shutdown: stops renewing and gives the lease up, so another replica takes it
    /// at its next renewal instead of waiting for it to lapse. Work begun under it still
    /// holds the lease row until it commits; nothing begins under it afterwards.
    pub async fn release(&self, store: &Store) {
        let Some(shared) = &self.shared else { return };
        shared.renewal.abort();
        match store.release_lease(LEASE, &shared.holder).await {
            Ok(()) => tracing::info!(holder = %shared.holder, "background lease released"),
            Err(e) => {
                tracing::warn!(error = %e, "releasing the background lease failed; it lapses")
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        self.shared
            .as_ref()
            .is_none_or(|s| s.epoch.borrow().is_some())
    }

    /// The epoch this server leads under now (`Some(0)` alone on SQLite); `None` while
    /// another server leads.
    pub fn epoch(&self) -> Option<i64> {
        match &self.shared {
            None => Some(0),
            Some(s) => *s.epoch.borrow(),
        }
    }

    /// The audit actor for `component`'s work under `epoch`: which process wrote it, under
    /// which tenure (`system:rollouts@r1:<16 hex>#3`; the suffix is new at each start). Just
    /// the component when alone on SQLite.
    pub fn actor(&self, component: &str, epoch: i64) -> String {
        match &self.shared {
            None => format!("system:{component}"),
            Some(s) => format!("system:{component}@{}#{epoch}", s.holder),
        }
    }

    /// Where work begun under `epoch` writes: `None` unless the lease is still held under it
    /// (work decided under an earlier tenure must not be saved under a later one).
    pub async fn sweep_under<'a>(
        &self,
        store: &'a Store,
        epoch: i64,
    ) -> flotilla_store::StoreResult<Option<Sweep<'a>>> {
        let Some(shared) = &self.shared else {
            return Ok(Some(Sweep::Alone(store)));
        };
        Ok(store
            .begin_fenced(LEASE, &shared.holder, epoch, STALL_LIMIT)
            .await?
            .map(Sweep::Fenced))
    }

    /// Where a sweep writes now; `None` when another server leads.
    pub async fn sweep<'a>(
        &self,
        store: &'a Store,
    ) -> flotilla_store::StoreResult<Option<Sweep<'a>>> {
        match self.epoch() {
            Some(epoch) => self.sweep_under(store, epoch).await,
            None => Ok(None),
        }
    }
}
