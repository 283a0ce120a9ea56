//! Security limits shared by every replica on one PostgreSQL database: failed logins, and
//! anonymous requests (`/sign-csr`, registrations). The in-memory limiters stay in front
//! (they cost nothing and refuse what one replica alone has seen past a limit); the counts
//! here, in the database, make replicas refuse at the shared limit instead of each at its own.
//! The same limits and keys as the in-memory ones (addresses by [`address_key`]). Not used on SQLite: one process
//! owns that database, and a write per login attempt would compete with ingest for its one
//! writer.

use std::net::IpAddr;
use std::time::Duration;

use flotilla_store::Store;

use crate::login_limits::{Refused, WINDOW, address_key, anonymous_decision, login_decision};

/// How often each replica removes windows that have ended.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

fn window_ms() -> i64 {
    i64::try_from(WINDOW.as_millis()).unwrap_or(i64::MAX)
}

/// A replica's own decision, then, if it let the attempt through, the shared count's (counted
/// only then: a locally refused attempt costs the database nothing).
pub async fn and_shared(
    local: Result<(), Refused>,
    shared: Option<impl std::future::Future<Output = Result<(), Refused>>>,
) -> Result<(), Refused> {
    local?;
    match shared {
        Some(shared) => shared.await,
        None => Ok(()),
    }
}

#[derive(Debug, Clone)]
pub struct SharedLimits {
    store: Store,
}

fn address(from: Option<IpAddr>) -> String {
    address_key(from).map_or_else(|| "unknown".to_string(), |a| a.to_string())
}

/// What an anonymous request is counted as.
#[derive(Debug, Clone, Copy)]
pub enum Anonymous {
    SignCsr,
    Registration,
}

impl Anonymous {
    fn key(self, from: Option<IpAddr>) -> String {
        let kind = match self {
            Anonymous::SignCsr => "sign-csr",
            Anonymous::Registration => "register",
        };
        format!("{kind}:{}", address(from))
    }
}

fn keys(account: &str, from: Option<IpAddr>) -> (String, String) {
    let from = address(from);
    (
        format!("login-address:{from}"),
        format!("login-account:{from}:{account}"),
    )
}

impl SharedLimits {
    /// Counts in `store`, pruned in the background.
    pub fn start(store: Store) -> SharedLimits {
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
        SharedLimits { store }
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

    /// Starts an anonymous request, counted on every replica: refused, or counted until
    /// [`Self::anonymous_succeeded`].
    pub async fn begin_anonymous(
        &self,
        kind: Anonymous,
        from: Option<IpAddr>,
    ) -> Result<(), Refused> {
        match self
            .store
            .count_attempts(&[&kind.key(from)], window_ms())
            .await
        {
            Ok(before) => anonymous_decision(u64::try_from(before[0]).unwrap_or(0)),
            Err(e) => {
                tracing::warn!(error = %e, "shared request counts unavailable; this replica's own limits apply");
                Ok(())
            }
        }
    }

    pub async fn anonymous_succeeded(&self, kind: Anonymous, from: Option<IpAddr>) {
        if let Err(e) = self.store.give_back_attempt(&kind.key(from)).await {
            tracing::warn!(error = %e, "resetting shared request counts failed");
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
