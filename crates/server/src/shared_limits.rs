//! Login limits shared by every replica on one PostgreSQL database. The in-memory
//! [`LoginLimiter`](crate::login_limits::LoginLimiter) stays in front (it costs nothing and
//! refuses what one replica alone has seen past a limit); the counts here, in the database,
//! make replicas refuse at the shared limit instead of each at its own. The same limits and
//! keys as the in-memory ones (addresses by [`address_key`]). Not used on SQLite: one process
//! owns that database, and a write per login attempt would compete with ingest for its one
//! writer.

use std::net::IpAddr;
use std::time::Duration;

use flotilla_store::Store;

use crate::login_limits::{Refused, WINDOW, address_key, login_decision};

/// How often each replica removes windows that have ended.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

fn window_ms() -> i64 {
    i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug, Clone)]
pub struct SharedLoginLimits {
    store: Store,
}

fn keys(account: &str, from: Option<IpAddr>) -> (String, String) {
    let from = address_key(from).map_or_else(|| "unknown".to_string(), |a| a.to_string());
    (
        format!("login-address:{from}"),
        format!("login-account:{from}:{account}"),
    )
}

impl SharedLoginLimits {
    /// Counts in `store`, pruned in the background.
    pub fn start(store: Store) -> SharedLoginLimits {
        let pruning = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = pruning.prune_attempts(window_ms()).await {
                    tracing::warn!(error = %e, "pruning shared login counts failed");
                }
            }
        });
        SharedLoginLimits { store }
    }

    /// Starts a login attempt, counted on every replica: refused, or counted as a failure
    /// until [`Self::succeeded`]. When the database cannot count, this replica's own limits
    /// still apply.
    pub async fn begin(&self, account: &str, from: Option<IpAddr>) -> Result<(), Refused> {
        let (address, pair) = keys(account, from);
        match self
            .store
            .count_attempts(&[&address, &pair], window_ms())
            .await
        {
            Ok(before) => login_decision(
                u64::try_from(before[0]).unwrap_or(0),
                u64::try_from(before[1]).unwrap_or(0),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "shared login counts unavailable; this replica's own limits apply");
                Ok(())
            }
        }
    }

    /// The attempt had the right password: as [`LoginLimiter::succeeded`](crate::login_limits::LoginLimiter::succeeded).
    pub async fn succeeded(&self, account: &str, from: Option<IpAddr>) {
        let (address, pair) = keys(account, from);
        let cleared = self.store.clear_attempts(&pair).await;
        let given = self.store.give_back_attempt(&address).await;
        if let Err(e) = cleared.and(given) {
            tracing::warn!(error = %e, "resetting shared login counts failed");
        }
    }
}
