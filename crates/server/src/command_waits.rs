//! Requests that wait for a command to finish (`GET .../commands/{id}?wait=SECS`). The
//! command's row is the truth; notices only say when to read it again. On PostgreSQL every
//! replica's changes arrive as notices ([`flotilla_store::CommandNotices`]), so a reply
//! ingested by one replica wakes a request waiting on another at once; each wait also re-reads
//! the row every [`REREAD`], which covers a notice lost while the listener reconnected. On
//! SQLite (one process) the re-read is all there is, at a shorter interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_store::{CommandRow, Store, StoreResult};
use tokio::sync::broadcast;

/// How often a wait reads its command again without a notice.
pub const REREAD: Duration = Duration::from_secs(1);
/// The same where no notices come (SQLite).
const REREAD_ALONE: Duration = Duration::from_millis(250);
/// The longest wait one request may ask for.
pub const MAX_WAIT_SECS: u64 = 30;
/// Requests waiting at once, across users; past it a request answers at once, as without a
/// wait (each waiting request re-reads the database every [`REREAD`]).
const MAX_WAITING: usize = 256;

#[derive(Debug)]
pub struct CommandWaits {
    changed: broadcast::Sender<String>,
    notices: bool,
    waiting: tokio::sync::Semaphore,
    /// Waits that ended because a notice named their command.
    pub woken: AtomicU64,
    /// Waits that found their command finished on a timed re-read.
    pub reread: AtomicU64,
}

impl CommandWaits {
    /// Starts listening for notices where the database sends them.
    pub async fn start(store: &Store) -> StoreResult<Arc<CommandWaits>> {
        let (changed, _) = broadcast::channel(1024);
        let listener = store.command_notices().await?;
        let waits = Arc::new(CommandWaits {
            changed: changed.clone(),
            notices: listener.is_some(),
            waiting: tokio::sync::Semaphore::new(MAX_WAITING),
            woken: AtomicU64::new(0),
            reread: AtomicU64::new(0),
        });
        if let Some(mut listener) = listener {
            tokio::spawn(async move {
                loop {
                    match listener.next().await {
                        // No receiver (nobody waits) is not an error.
                        Ok(id) => drop(changed.send(id)),
                        Err(e) => {
                            tracing::warn!(error = %e, "command notices interrupted; waits re-read");
                            tokio::time::sleep(REREAD).await;
                        }
                    }
                }
            });
        }
        Ok(waits)
    }

    /// The command `id` once it is final, or as it stands after `wait`; `None` if there is
    /// no such command. `visible` says whether the caller may see it (checked on every read).
    pub async fn finished(
        &self,
        store: &Store,
        id: &str,
        wait: Duration,
        visible: impl Fn(&CommandRow) -> bool,
    ) -> StoreResult<Option<CommandRow>> {
        // Subscribed before the first read: a change committed after it is noticed.
        let mut changed = self.changed.subscribe();
        let slot = self.waiting.try_acquire().ok();
        let wait = if slot.is_some() { wait } else { Duration::ZERO };
        let deadline = tokio::time::Instant::now() + wait;
        let reread = if self.notices { REREAD } else { REREAD_ALONE };
        let mut woken = false;
        loop {
            let Some(command) = store.command(id).await?.filter(&visible) else {
                return Ok(None);
            };
            if command.state.is_final() || tokio::time::Instant::now() >= deadline {
                if command.state.is_final() {
                    let counter = if woken { &self.woken } else { &self.reread };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Some(command));
            }
            let next_read = (tokio::time::Instant::now() + reread).min(deadline);
            woken = loop {
                match tokio::time::timeout_at(next_read, changed.recv()).await {
                    Ok(Ok(changed)) if changed == id => break true,
                    Ok(Ok(_)) => {}
                    // Notices were missed: read now.
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => break false,
                    Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                        tokio::time::sleep_until(next_read).await;
                        break false;
                    }
                }
            };
        }
    }
}
