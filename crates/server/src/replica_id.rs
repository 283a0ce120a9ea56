//! One running server per replica id. Two servers started with one `--replica-id` (the
//! default `main` twice, a copied config) would share its ingest session at the broker and
//! take it from each other without end; the second one is refused at start instead.
//!
//! Each server holds the lease `instance:<replica id>` under a holder of its own (the id and
//! a random suffix) and renews it every third of its time to live. A server that finds it
//! held by another looks again a renewal interval later: renewed meanwhile, its holder is
//! running and this server stops with the reason; not renewed, its holder is gone (killed
//! without releasing it) and this server takes it once it lapses, at most one time to live
//! later. A clean shutdown releases it, so a restart waits for nothing.

use std::time::Duration;

use flotilla_store::Store;

/// How long the lease outlives its holder's last renewal.
const TTL: Duration = Duration::from_secs(10);

/// The lease of one replica id while this server runs.
#[derive(Debug)]
pub struct ReplicaId {
    lease: String,
    holder: String,
    renewal: tokio::task::AbortHandle,
}

fn ttl_ms() -> i64 {
    i64::try_from(TTL.as_millis()).unwrap_or(i64::MAX)
}

/// Takes `replica`'s lease, or fails if another running server holds it.
pub async fn claim(store: &Store, replica: &str) -> anyhow::Result<ReplicaId> {
    let lease = format!("instance:{replica}");
    let holder = format!("{replica}:{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut seen: Option<(String, i64)> = None;
    loop {
        if store.hold_lease(&lease, &holder, ttl_ms()).await?.is_some() {
            break;
        }
        let now = store.lease(&lease).await?;
        if let (Some((before, until_before)), Some((after, until_after))) = (&seen, &now)
            && before == after
            && until_after > until_before
        {
            anyhow::bail!(
                "replica id {replica:?} is in use by another running server ({after}): give each replica its own --replica-id"
            );
        }
        if seen.is_none() {
            tracing::warn!(%lease, holder = ?now.as_ref().map(|n| &n.0), "another server held this replica id moments ago; waiting to see whether it still runs");
        }
        seen = now;
        tokio::time::sleep(TTL / 3 + Duration::from_secs(1)).await;
    }
    let (renewing, name, me) = (store.clone(), lease.clone(), holder.clone());
    let renewal = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TTL / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            match renewing.hold_lease(&name, &me, ttl_ms()).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::error!(lease = %name, "another server took this replica id: two servers now run as one replica")
                }
                Err(e) => tracing::warn!(error = %e, "renewing the replica id lease failed"),
            }
        }
    });
    Ok(ReplicaId {
        lease,
        holder,
        renewal: renewal.abort_handle(),
    })
}

impl ReplicaId {
    /// A clean shutdown: a restart under this id does not wait for the lease to lapse.
    pub async fn release(&self, store: &Store) {
        self.renewal.abort();
        if let Err(e) = store.release_lease(&self.lease, &self.holder).await {
            tracing::warn!(error = %e, "releasing the replica id lease failed; it lapses");
        }
    }
}
